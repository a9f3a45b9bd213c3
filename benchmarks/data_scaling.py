"""Does the data path scale out? Bytes read and loader throughput per rank for 1, 4, 16 and 64
simulated ranks, and time to the first batch after resuming at 1%, 50% and 99% of an epoch, for
sabiscale's indexed loader and for the previous design (every rank reads every sample of every
shard in a seeded shard order through a shuffle buffer, and keeps only its own micro-batches;
resuming reads from the start of the stream up to the saved position), on >= 1 GB of shards; and
the indexed loader again under a two-phase data.mix.schedule (data/schedule.py: the shards taken
as four sources, the mix switching at half an epoch), whose samples come from every source.

    .venv/bin/python benchmarks/data_scaling.py          # ~10 minutes; writes benchmarks/results/data_scaling.{json,md}

Simulated ranks are rank ids in this process (the loader never communicates): each measured rank
reads its whole share of one epoch. Bytes are what the OS counted for this process (/proc
self/io rchar: shard, index and everything else read), measured per rank. The corpus is
generated once into runs/bench/scaling_shards (random tokens, the real format and sizes).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from itertools import count, islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ROOT / "runs" / "bench" / "scaling_shards"
SEQ_LEN, PER_SHARD, MICRO_BATCH, SEED = 512, 1024, 8, 1234
RANKS = (1, 4, 16, 64)


def read_chars() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar")))


def generate(target_bytes: float) -> dict:
    """Random packed sequences in the real format until the shards hold `target_bytes`."""
    from sabiscale.shards.format import read_manifest, write_manifest
    from sabiscale.shards.pack import PackedSequence, PackStats
    from sabiscale.shards.write import write_split

    if (SHARDS / "manifest.json").is_file():
        return read_manifest(SHARDS)
    rng = np.random.default_rng(0)
    per_sample = 7 * 1024  # ~bytes of one sequence with its tar headers; checked below
    n = int(target_bytes / per_sample / PER_SHARD + 1) * PER_SHARD
    sequences = []
    for _ in range(n):
        lengths = rng.integers(32, 200, size=8)
        lengths = lengths[np.cumsum(lengths) <= SEQ_LEN]
        lengths = np.append(lengths, SEQ_LEN - lengths.sum()) if lengths.sum() < SEQ_LEN else lengths
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        docs = [[int(s), int(n), "text", "yor"] for s, n in zip(starts, lengths)]
        sequences.append(PackedSequence(rng.integers(0, 16000, SEQ_LEN, dtype=np.uint32),
                                        rng.integers(0, 2, SEQ_LEN, dtype=np.uint8), positions, docs))
    stats = PackStats(sequences=n, tokens=n * SEQ_LEN)
    splits = {"train": write_split(sequences, SHARDS, "train", PER_SHARD, stats),
              "val": write_split(sequences[:PER_SHARD], SHARDS, "val", PER_SHARD, PackStats(PER_SHARD, PER_SHARD * SEQ_LEN))}
    write_manifest(SHARDS, "benchmark", SEQ_LEN, 0, splits)
    return read_manifest(SHARDS)


def indexed_stream(manifest: dict, rank: int, ranks: int, start: int = 0, plan=None):
    from sabiscale.data.batch import Vocab
    from sabiscale.data.loader import make_loader
    from sabiscale.shards.format import split_shards

    return make_loader(split_shards(SHARDS, manifest, "train"), Vocab.from_manifest(manifest), MICRO_BATCH, rank,
                       ranks, SEED, True, 0, start, plan=plan)


SOURCES = ("text/yor", "text/hau", "translation/yor", "translation/hau")


def scheduled_plan(manifest: dict):
    """The shards dealt round-robin to four sources, and two phases: text x3 for the first half
    epoch, translation x3 after (one rank, one accumulation step: a step is one micro-batch)."""
    from sabiscale.config import MixConfig
    from sabiscale.data.schedule import plan_schedule

    split = manifest["splits"]["train"]
    sources = {name: {"shards": [], "sequences": 0, "tokens": 0} for name in SOURCES}
    for i, shard in enumerate(split["shards"]):
        source = sources[SOURCES[i % len(SOURCES)]]
        source["shards"].append(shard["name"])
        source["sequences"] += shard["sequences"]
        source["tokens"] += shard["sequences"] * SEQ_LEN
    half = sum(s["sequences"] for s in split["shards"]) // 2 // MICRO_BATCH
    mix = MixConfig(schedule=[{"start_step": 0, "task_weights": {"text": 3}},
                              {"start_step": half, "task_weights": {"translation": 3}}])
    return plan_schedule(mix, {**split, "sources": sources}, MICRO_BATCH, "benchmark shards")


def previous_stream(manifest: dict, rank: int, ranks: int, start: int = 0):
    """The previous loader's algorithm: every rank reads every sample, decodes only its own."""
    import webdataset as wds

    from sabiscale.data.batch import Vocab, collate
    from sabiscale.shards.format import decode_sample, raw_samples

    vocab = Vocab.from_manifest(manifest)
    urls = [str(SHARDS / s["name"]) for s in manifest["splits"]["train"]["shards"]]

    def samples():
        for epoch in count():
            rng = random.Random(SEED * 1_000_003 + epoch)
            order = urls[:]
            rng.shuffle(order)
            yield from wds.shuffle(64, initial=64, rng=rng)(raw_samples({"url": u} for u in order))

    stream = samples()
    for _ in islice(stream, start * MICRO_BATCH):  # resuming replays the stream up to the position
        pass
    for index in count(start):
        raw = list(islice(stream, MICRO_BATCH))
        if (index - start) % ranks == rank:
            yield collate([decode_sample(r) for r in raw], index, vocab)


def measure_share(make, manifest: dict, rank: int, ranks: int) -> dict:
    """One rank reads its share of one epoch: bytes (OS count), seconds, tokens/s."""
    epoch_batches = sum(s["sequences"] for s in manifest["splits"]["train"]["shards"]) // MICRO_BATCH
    mine = len(range(rank, epoch_batches, ranks))
    before, t0 = read_chars(), time.perf_counter()
    stream = make(manifest, rank, ranks)
    for _ in range(mine):
        next(stream)
    seconds = time.perf_counter() - t0
    return {"rank": rank, "batches": mine, "bytes": read_chars() - before, "seconds": seconds,
            "tokens_per_s": mine * MICRO_BATCH * SEQ_LEN / seconds}


def resume_latency(make, manifest: dict, fraction: float) -> float:
    epoch_batches = sum(s["sequences"] for s in manifest["splits"]["train"]["shards"]) // MICRO_BATCH
    t0 = time.perf_counter()
    next(iter(make(manifest, 0, 1, int(fraction * epoch_batches))))
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.05)
    parser.add_argument("--previous-ranks", type=int, nargs="*", default=[4],
                        help="rank counts measured for the previous design (its bytes per rank do not depend on it)")
    args = parser.parse_args()
    manifest = generate(args.gigabytes * 2**30)
    shards = manifest["splits"]["train"]["shards"]
    corpus = sum(s["bytes"] for s in shards)
    largest = max(s["bytes"] for s in shards)
    consumed = json.loads((ROOT / "benchmarks/results/data_throughput.json").read_text())["training_tokens_per_s_per_rank"]
    from step_throughput import git_commit
    commit = git_commit()
    from step_throughput import cpu_description

    cpu = cpu_description()
    result = {"command": ".venv/bin/python benchmarks/data_scaling.py", "date": time.strftime("%Y-%m-%d"),
              "commit": commit, "cpu": cpu, "corpus_bytes": corpus, "shards": len(shards), "largest_shard_bytes": largest,
              "training_tokens_per_s_per_rank": consumed, "indexed": {}, "scheduled": {}, "previous": {}}
    plan = scheduled_plan(manifest)
    scheduled = lambda m, r, n, s=0: indexed_stream(m, r, n, s, plan)  # noqa: E731
    for ranks in RANKS:
        measured = sorted({0, ranks // 2, ranks - 1})
        result["indexed"][ranks] = [measure_share(indexed_stream, manifest, r, ranks) for r in measured]
        result["scheduled"][ranks] = [measure_share(scheduled, manifest, r, ranks) for r in measured]
        print(ranks, result["indexed"][ranks], result["scheduled"][ranks], flush=True)
    for ranks in args.previous_ranks:
        result["previous"][ranks] = [measure_share(previous_stream, manifest, 0, ranks)]
        print("previous", ranks, result["previous"][ranks], flush=True)
    result["resume_seconds"] = {
        name: {f: statistics.median(resume_latency(make, manifest, f) for _ in range(3 if name == "indexed" else 1))
               for f in (0.01, 0.5, 0.99)}
        for name, make in (("indexed", lambda m, r, n, s: indexed_stream(m, r, n, s)), ("scheduled", scheduled),
                           ("previous", lambda m, r, n, s: previous_stream(m, r, n, s)))}
    (ROOT / "benchmarks/results/data_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "benchmarks/results/data_scaling.md").write_text(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    corpus, largest = r["corpus_bytes"], r["largest_shard_bytes"]
    lines = ["# Data path scaling: bytes and throughput per rank, resume latency", "",
             f"Command: `{r['command']}`  ", f"Date: {r['date']}, at commit {r.get('commit', '?')}, 2 cores of "
             f"{r.get('cpu', 'a CPU')}; corpus {corpus / 2**30:.2f} GiB in "
             f"{r['shards']} shards (largest {largest / 2**20:.1f} MiB), micro-batch {MICRO_BATCH} x {SEQ_LEN}.", "",
             "| loader | ranks | rank | bytes read | corpus / ranks | ratio | bar: <= 1.25 x share + one shard | tokens/s | x training |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name in ("indexed", "scheduled", "previous"):
        for ranks, rows in r.get(name, {}).items():
            share = corpus / int(ranks)
            for row in rows:
                ok = row["bytes"] <= 1.25 * share + largest
                lines.append(f"| {name} | {ranks} | {row['rank']} | {row['bytes'] / 2**20:,.1f} MiB | "
                             f"{share / 2**20:,.1f} MiB | {row['bytes'] / share:.2f} | {'met' if ok else 'not met'} | "
                             f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / r['training_tokens_per_s_per_rank']:,.0f}x |")
    lines += ["", "Time to the first batch after resuming (seconds; bar: at 99% <= 2 x at 1%):", "",
              "| loader | 1% | 50% | 99% | 99% / 1% |", "|---|---:|---:|---:|---:|"]
    for name, t in r["resume_seconds"].items():
        lines.append(f"| {name} | {t['0.01']:.3f} | {t['0.5']:.3f} | {t['0.99']:.3f} | {t['0.99'] / t['0.01']:.1f} |"
                     if isinstance(next(iter(t)), str) else
                     f"| {name} | {t[0.01]:.3f} | {t[0.5]:.3f} | {t[0.99]:.3f} | {t[0.99] / t[0.01]:.1f} |")
    lines += ["", f"Training consumes {r['training_tokens_per_s_per_rank']:,.0f} tokens/s per rank here "
              "(benchmarks/results/data_throughput.json); 'x training' is the loader's margin over it. The previous "
              "design reads the whole corpus on every rank whatever the number of ranks (its bytes per rank do not "
              "fall with more ranks), and its resume replays the stream. 'scheduled' is the indexed loader drawing a "
              "two-phase data.mix.schedule over four sources (text x3 for the first half epoch, translation x3 "
              "after); a rank's share of an epoch then repeats some sequences and skips others, so its bytes are "
              "its share of samples, not of distinct shard bytes."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
