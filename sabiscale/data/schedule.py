"""The training mix drawn at load time, phase by phase (data.mix.schedule).

`prepare` wrote the training shards per source (task x language) at their natural sizes, with
each source's sequences and raw size in the manifest. A phase's weights (MixWeights: temperature,
task and language weights, in data.mix.unit) give each source a target share of the phase's
text; since a sequence of source s holds on average u_s units, the loader draws sources in
proportion to target_s / u_s sequences.

Which source the k-th sample of the global stream comes from is a pure function of k, so any
number of ranks and workers agree on it and a resume is a seek: phases start at sample
start_step x samples per optimizer step; a phase is cut into blocks of BLOCK samples, each holding
exactly each source's count (largest-remainder rounding of its share) in a seeded order; the
m-th draw of a source is sample m of that source's own SampleOrder (seeded, epochs chained), so a
small source repeats and a large one is read a part per epoch. The count of draws before any k is
arithmetic, not a replay.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sabiscale.config import MixConfig, MixWeights, check_language_weights
from sabiscale.data.order import SampleOrder
from sabiscale.errors import UserError
from sabiscale.prep.mix import target_tokens

BLOCK = 1024  # samples in which every source's count is exact (each share within 1/BLOCK)
SCHEDULE_VERSION = "block-apportioned-v1"


@dataclass(frozen=True)
class Phase:
    start_step: int
    start_sample: int
    counts: tuple[int, ...]  # draws of each source per BLOCK samples (sum BLOCK)
    target: tuple[float, ...]  # each source's share of the phase's text, in the mix unit


@dataclass(frozen=True)
class MixPlan:
    """What the loader draws from, phase by phase (built by `plan_schedule`)."""
    sources: tuple[str, ...]            # "task/lang", sorted
    shards: tuple[tuple[int, ...], ...]  # each source's shards, as indexes into the split's shard list
    units_per_sequence: tuple[float, ...]
    unit: str
    phases: tuple[Phase, ...]
    samples_per_step: int  # over all ranks: phases start at start_step x this

    def definition(self) -> dict:
        """Part of the stream definition a checkpoint's position refers to."""
        return {"version": SCHEDULE_VERSION, "block": BLOCK, "sources": list(self.sources),
                "phases": [[p.start_sample, list(p.counts)] for p in self.phases]}


def plan_schedule(mix: MixConfig, train_split: dict, samples_per_step: int, where: str) -> MixPlan:
    """The draw counts of each phase of `mix.schedule` over the sources of a manifest's train
    split (`where` names the manifest in errors)."""
    sources = train_split.get("sources")
    if not sources:
        raise UserError(f"data.mix.schedule is set, but {where} holds shards prepared without it (one mixed set, not "
                        "one per task x language): run `sabiscale prepare` with data.mix.schedule set (into a new "
                        "data.dir) once; after that, schedules change without preparing again")
    names = sorted(sources)
    position = {entry["name"]: i for i, entry in enumerate(train_split["shards"])}
    missing = [n for key in names for n in sources[key]["shards"] if n not in position]
    if missing:
        raise UserError(f"{where}: sources list shard(s) {missing[:3]} that its train split does not; the manifest "
                        "is damaged: re-run `sabiscale prepare`")
    natural = {tuple(key.split("/", 1)): sources[key][mix.unit] for key in names}
    per_sequence = [sources[key][mix.unit] / sources[key]["sequences"] for key in names]
    languages = {key.split("/", 1)[1] for key in names}
    phases = []
    for n, weights in enumerate(mix.schedule):
        check_language_weights(weights.language_weights, languages, where)
        target = source_targets(natural, weights, names)
        draws = [t / u if u else 0.0 for t, u in zip(target, per_sequence)]
        if sum(draws) == 0:
            raise UserError(f"data.mix.schedule phase {n} (start_step {weights.start_step}) gives every source of "
                            f"{where} weight 0: nothing to draw; give one task and language a weight above 0")
        phases.append(Phase(weights.start_step, weights.start_step * samples_per_step,
                            apportion([d / sum(draws) for d in draws], BLOCK), tuple(target)))
    return MixPlan(tuple(names), tuple(tuple(position[n] for n in sources[key]["shards"]) for key in names),
                   tuple(per_sequence), mix.unit, tuple(phases), samples_per_step)


def source_targets(natural: dict[tuple[str, str], float], weights: MixWeights, names: list[str]) -> list[float]:
    """Each source's target share of the text (sums to 1), in the order of `names`."""
    wanted = target_tokens(natural, weights)
    total = sum(wanted.values())
    return [wanted[tuple(key.split("/", 1))] / total for key in names]


def apportion(shares: list[float], size: int) -> tuple[int, ...]:
    """Whole counts summing to `size`, each within one of share x size (largest remainder); a
    source with a share above 0 keeps at least one draw."""
    exact = [s * size for s in shares]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[:size - sum(counts)]:
        counts[i] += 1
    for i, share in enumerate(shares):
        if share > 0 and counts[i] == 0:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return tuple(counts)


class ScheduledOrder:
    """locate(k): the (shard, sample within the shard) of the k-th sample of a scheduled stream;
    the same interface as SampleOrder."""

    def __init__(self, plan: MixPlan, shard_sequences: list[int], seed: int) -> None:
        self.plan, self.seed = plan, seed
        self.orders = [SampleOrder([shard_sequences[i] for i in shards], (seed, n)) for n, shards in enumerate(plan.shards)]
        self.starts = [p.start_sample for p in plan.phases]
        # draws of each source before each phase starts
        self.before = [np.zeros(len(plan.sources), dtype=np.int64)]
        for p in range(len(plan.phases) - 1):
            self.before.append(self.before[-1] + self.draws(p, self.starts[p + 1] - self.starts[p]))

    def draws(self, phase: int, samples: int) -> np.ndarray:
        """Draws of each source in the first `samples` samples of a phase."""
        blocks, rest = divmod(samples, BLOCK)
        counts = np.asarray(self.plan.phases[phase].counts, dtype=np.int64) * blocks
        layout, _ = self._block(phase, blocks)
        return counts + np.bincount(layout[:rest], minlength=len(self.plan.sources))

    def locate(self, k: int) -> tuple[int, int]:
        phase = bisect.bisect_right(self.starts, k) - 1
        block, offset = divmod(k - self.starts[phase], BLOCK)
        layout, nth = self._block(phase, block)
        source = int(layout[offset])
        m = int(self.before[phase][source]) + block * self.plan.phases[phase].counts[source] + int(nth[offset])
        shard, sample = self.orders[source].locate(m)
        return self.plan.shards[source][shard], sample

    @lru_cache(maxsize=8)
    def _block(self, phase: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        """A block's source per offset, and how many draws of that source precede it in the block."""
        counts = self.plan.phases[phase].counts
        layout = np.repeat(np.arange(len(counts)), counts)
        np.random.default_rng([self.seed, phase, block, 2]).shuffle(layout)
        nth = np.empty(BLOCK, dtype=np.int64)
        for source in range(len(counts)):
            where = np.flatnonzero(layout == source)
            nth[where] = np.arange(len(where))
        return layout, nth


def realised_mix(plan: MixPlan, order: ScheduledOrder, end_sample: int) -> list[dict]:
    """Per phase up to `end_sample` (the run's last): its steps, the target share of each source and
    the share the drawn sequences carry, in the mix unit (draws x the source's units per sequence)."""
    report = []
    for p, phase in enumerate(plan.phases):
        if phase.start_sample >= end_sample:
            break
        stop = plan.phases[p + 1].start_sample if p + 1 < len(plan.phases) else end_sample
        draws = order.draws(p, min(stop, end_sample) - phase.start_sample)
        carried = draws * np.asarray(plan.units_per_sequence)
        report.append({"phase": p, "start_step": phase.start_step, "samples": int(draws.sum()), "unit": plan.unit,
                       "sources": {name: {"target_share": round(phase.target[i], 6),
                                          "realised_share": round(float(carried[i] / carried.sum()), 6),
                                          "sequences": int(draws[i])}
                                   for i, name in enumerate(plan.sources)}})
    return report
