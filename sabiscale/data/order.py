"""The order of the global sample stream: which sample of which shard is the k-th, for any k, in
O(log shards) and without reading anything.

The stream is epochs chained without a seam (sample k is position k mod N of epoch k div N, N
samples per epoch). Inside an epoch (shuffled): the shards in a seeded random order, and the
samples of each shard in a seeded random order; so a stretch of the stream reads from one shard
at a time (reads stay local), every epoch visits every sample once in a new order, and the order
is the same for any number of ranks and workers. Documents were already shuffled across the
whole corpus before packing (prep/prepare.py), so neighbouring samples are not neighbouring text.
Unshuffled (validation, probes): shards in manifest order, samples in file order.
"""
from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np


class SampleOrder:
    def __init__(self, counts: list[int], seed: int | tuple[int, ...], shuffle: bool = True) -> None:
        self.counts = list(counts)
        self.total = sum(self.counts)
        self.seed = list(seed) if isinstance(seed, tuple) else [seed]  # a tuple: one stream of several (data/schedule.py)
        self.shuffle = shuffle
        if self.total == 0:
            raise ValueError("no samples to read")

    def locate(self, k: int) -> tuple[int, int]:
        """(shard, sample within the shard) of the k-th sample of the stream."""
        epoch, position = divmod(k, self.total)
        order, starts = self._epoch(epoch)
        j = bisect.bisect_right(starts, position) - 1
        shard, offset = order[j], position - starts[j]
        return shard, int(self._within(epoch, shard)[offset]) if self.shuffle else offset

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """This epoch's shard order and where each of them starts in the epoch."""
        order = list(range(len(self.counts)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng([*self.seed, epoch]).permutation(len(self.counts))]
        starts = np.concatenate([[0], np.cumsum([self.counts[i] for i in order])[:-1]]).tolist()
        return order, starts

    @lru_cache(maxsize=64)
    def _within(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch, shard, 1]).permutation(self.counts[shard])
