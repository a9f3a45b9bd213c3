"""Micro-batches for one rank and dataloader worker, read straight from indexed shards.

The global stream of micro-batches is the same whatever the world size: micro-batch j holds
samples j*B .. j*B+B-1 of the global sample order (data/order.py), and rank r keeps micro-batch j
when j % world_size == r (and, inside a rank, worker w when (j // world_size) % num_workers == w).
So 2 ranks x 1 micro-batch see exactly what 1 rank x 2 accumulation steps sees. Each rank reads
only the bytes of its own samples: every shard has an index of where each sample lives
(shards/format.py), so a sample is one seek and one read. A position in the stream is a global
micro-batch number, so resuming seeks straight to it (no replay) on any number of ranks and
workers. Epochs chain without a seam; the stream is infinite and the loop decides how many steps.
With data.mix.schedule the k-th sample comes from a ScheduledOrder (data/schedule.py) instead: the
same promises, the phase being a function of the position.

Shards are local files (or any mounted file system every rank sees): reading by offset needs
seekable files.
"""
from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from pathlib import Path

import torch

from sabiscale.data.batch import Batch, Vocab, collate
from sabiscale.data.order import SampleOrder
from sabiscale.data.schedule import MixPlan, ScheduledOrder
from sabiscale.errors import UserError
from sabiscale.shards.format import ShardReader, decode_sample

ORDER_VERSION = "indexed-shuffle-v1"  # part of the stream definition a checkpoint's position refers to


class ShardLoader(torch.utils.data.IterableDataset):
    """Infinite micro-batches of one rank from global micro-batch `start` on; wrap in a
    DataLoader(batch_size=None) for workers."""

    def __init__(self, shards: list[dict], vocab: Vocab, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, num_workers: int = 0, start: int = 0, pin_memory: bool = False,
                 plan: MixPlan | None = None) -> None:
        super().__init__()
        self.shards, self.vocab, self.batch_size, self.seed, self.shuffle = shards, vocab, batch_size, seed, shuffle
        self.rank, self.world_size, self.num_workers, self.start = rank, world_size, num_workers, start
        self.pin_memory, self.plan = pin_memory, plan
        sequences = [s["sequences"] for s in shards]
        self.order = ScheduledOrder(plan, sequences, seed) if plan is not None else SampleOrder(sequences, seed, shuffle)
        self.reader = ShardReader(shards)

    def _owns(self, batch_index: int, worker: int) -> bool:
        k = batch_index - self.start
        if k % self.world_size != self.rank:
            return False
        return (k // self.world_size) % max(1, self.num_workers) == worker

    def micro_batch(self, batch_index: int) -> Batch:
        first = batch_index * self.batch_size
        raw = [self.reader.read(*self.order.locate(first + i)) for i in range(self.batch_size)]
        return collate([decode_sample(r) for r in raw], batch_index, self.vocab)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for batch_index in count(self.start):
            if self._owns(batch_index, worker):
                yield self.micro_batch(batch_index)


class BatchStream:
    """This rank's micro-batches, with its position in the global stream for exact resume.

    The position counts global micro-batches (all ranks) consumed by completed rounds, so a
    checkpoint's position is valid for any world size and number of workers.
    """

    def __init__(self, dataset: ShardLoader) -> None:
        self.dataset = dataset
        self.position = dataset.start
        self._it = self._batches()

    def _batches(self):
        d = self.dataset
        if d.num_workers == 0:
            return iter(d)
        # on CUDA the workers' batches are pinned in DataLoader's own thread, so the copy to the GPU
        # is asynchronous (the loop copies with non_blocking=True) and the next ones are prefetched
        return iter(torch.utils.data.DataLoader(d, batch_size=None, num_workers=d.num_workers, persistent_workers=True,
                                                pin_memory=d.pin_memory, prefetch_factor=2))

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        batch = next(self._it)
        d = self.dataset
        self.position = d.start + ((batch.index - d.start) // d.world_size + 1) * d.world_size
        return batch

    @property
    def bytes_read(self) -> int:
        """Shard bytes this process read (workers read their own; see ShardReader)."""
        return self.dataset.reader.bytes_read

    def state_dict(self) -> dict:
        d = self.dataset
        return {"position": self.position, **stream_definition(d.batch_size, d.seed, d.shuffle, d.shards, d.plan)}


def stream_definition(batch_size: int, seed: int, shuffle: bool, shards: list[dict], plan: MixPlan | None = None) -> dict:
    definition = {"batch_size": batch_size, "seed": seed, "order": ORDER_VERSION if shuffle else "unshuffled",
                  "urls": [Path(s["path"]).name for s in shards]}
    if plan is not None:  # absent without a schedule, so checkpoints of unscheduled runs keep resuming
        definition["mix_schedule"] = plan.definition()
    return definition


def check_resumable(state: dict, batch_size: int, seed: int, shuffle: bool, shards: list[dict],
                    plan: MixPlan | None = None) -> None:
    """The saved position only means the same samples under the same stream definition."""
    now = stream_definition(batch_size, seed, shuffle, shards, plan)
    changed = [k for k in dict.fromkeys([*now, "mix_schedule"]) if state.get(k) != now.get(k)]  # a schedule removed too
    if "order" in changed and "order" not in state:
        raise UserError("cannot resume the data stream exactly: the checkpoint's position refers to the sample order "
                        "of an earlier sabiscale (a shuffle buffer over every shard); finish that run with the "
                        "version that started it, or start a new run (train.resume=never with a new output_dir)")
    if "mix_schedule" in changed:
        raise UserError("cannot resume the data stream exactly: data.mix.schedule (or the global batch size its steps "
                        "are counted in) changed since the checkpoint, so the phases would draw other samples: "
                        f"restore the schedule it was saved with (phases {(state.get('mix_schedule') or {}).get('phases')} "
                        "as [start sample, draws per source per block]), or start a new run in a new output_dir")
    if changed:
        raise UserError(f"cannot resume the data stream exactly: {', '.join(changed)} changed since the checkpoint "
                        f"(was {[state.get(k) for k in changed]}, now {[now[k] for k in changed]}); "
                        "restore them, or start a new run in a new output_dir")


def make_loader(shards: list[dict], vocab: Vocab, batch_size: int, rank: int, world_size: int, seed: int,
                shuffle: bool = True, num_workers: int = 0, start: int = 0, pin_memory: bool = False,
                plan: MixPlan | None = None) -> BatchStream:
    """shards: a split's entries as `split_shards` gives them (path, sequences, bytes, index); plan:
    the scheduled mix over them (data/schedule.py), or None for the shards' own mix."""
    return BatchStream(ShardLoader(shards, vocab, batch_size, rank, world_size, seed, shuffle, num_workers, start,
                                   pin_memory, plan))
