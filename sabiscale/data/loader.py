"""WebDataset pipeline yielding micro-batches for one rank and dataloader worker.

The global stream of micro-batches is the same whatever the world size: every rank reads the
same seeded sequence of samples (shard order and shuffle buffer seeded per epoch), groups them
into micro-batches, and keeps micro-batch j when j % world_size == rank (and, inside a rank, when
(j // world_size) % num_workers == worker). So 2 ranks x 1 micro-batch see exactly what 1 rank x 2
accumulation steps sees, and a rank decodes only its own samples. Epochs chain without a seam;
the stream is infinite and the training loop decides how many steps to take.

Sources are local paths or any URL webdataset opens (`pipe:cat FILE`, http, ...).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import count, islice
from pathlib import Path

import torch
import webdataset as wds

from sabiscale.shards.format import READ_ERRORS, decode_sample, raw_samples
from sabiscale.data.batch import Batch, Vocab, collate
from sabiscale.errors import UserError

def shard_urls(shards_dir: Path, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
        raise UserError(f"{shards_dir}/manifest.json has no {split!r} shards; re-run `sabiscale prepare`")
    return [str(shards_dir / s["name"]) for s in manifest["splits"][split]["shards"]]


class ShardLoader(torch.utils.data.IterableDataset):
    """Infinite micro-batches of one rank from global micro-batch `start` on; wrap in a
    DataLoader(batch_size=None) for workers."""

    def __init__(self, urls: list[str], vocab: Vocab, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int = 64, num_workers: int = 0, start: int = 0,
                 expected: dict[str, int] | None = None) -> None:
        super().__init__()
        self.urls, self.vocab, self.batch_size, self.seed = list(urls), vocab, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.num_workers, self.start = shuffle_buffer, num_workers, start
        self.expected = expected or {}  # url -> samples the manifest lists for it

    def _samples(self) -> Iterator[dict]:
        for epoch in count():
            rng = random.Random(self.seed * 1_000_003 + epoch)
            urls = self.urls[:]
            rng.shuffle(urls)
            samples = counted_samples(urls, self.expected)
            if self.shuffle_buffer > 1:
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            yield from samples

    def _owns(self, batch_index: int, worker: int) -> bool:
        k = batch_index - self.start
        if k % self.world_size != self.rank:
            return False
        return (k // self.world_size) % max(1, self.num_workers) == worker

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        samples = self._samples()
        # Resuming: step over the samples of the micro-batches already trained on (read, not decoded).
        for _ in islice(samples, self.start * self.batch_size):
            pass
        for batch_index in count(self.start):
            raw = list(islice(samples, self.batch_size))
            if self._owns(batch_index, worker):
                yield collate([decode_sample(r) for r in raw], batch_index, self.vocab)


class ShardEndedEarly(UserError):
    """A shard yielded fewer samples than its manifest entry lists."""


def counted_samples(urls: list[str], expected: dict[str, int]) -> Iterator[dict]:
    """Raw samples of `urls` in order, checking each shard, as soon as it is read, against the
    sample count its manifest lists: reading a tar stops quietly at a shard cut at a block boundary,
    which would otherwise shorten the epoch without a word. Read errors name the shard."""
    reading: dict = {"url": None}
    seen: dict[str, int] = {}

    def check(url: str | None) -> None:
        if url is not None and url in expected and seen.get(url, 0) != expected[url]:
            raise ShardEndedEarly(f"{url}: {seen.get(url, 0)} samples, its manifest lists {expected[url]}: the shard "
                                  "is truncated or was replaced; run `sabiscale shards verify` on its directory and "
                                  "restore or re-write it")

    def sources():
        for url in urls:
            check(reading["url"])  # the previous shard has been read to its end
            reading["url"] = url
            yield {"url": url}
        check(reading["url"])

    try:
        for sample in raw_samples(sources()):
            seen[sample["__url__"]] = seen.get(sample["__url__"], 0) + 1
            yield sample
    except ShardEndedEarly:
        raise
    except READ_ERRORS as err:
        raise UserError(f"{reading['url']}: the shard cannot be read ({type(err).__name__}: {err}); it is truncated "
                         f"or corrupted: run `sabiscale shards verify` on its directory and restore or re-write it") from err


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
        return iter(torch.utils.data.DataLoader(d, batch_size=None, num_workers=d.num_workers, persistent_workers=True))

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        batch = next(self._it)
        d = self.dataset
        self.position = d.start + ((batch.index - d.start) // d.world_size + 1) * d.world_size
        return batch

    def state_dict(self) -> dict:
        d = self.dataset
        return {"position": self.position, "batch_size": d.batch_size, "seed": d.seed,
                "shuffle_buffer": d.shuffle_buffer, "urls": [Path(u).name for u in d.urls]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from the next unseen micro-batch of a saved state (any world size or number
        of workers); a state of another stream definition is refused."""
        d = self.dataset
        check_resumable(state, d.batch_size, d.seed, d.shuffle_buffer, d.urls)
        d.start = self.position = state["position"]
        self._it = self._batches()


def check_resumable(state: dict, batch_size: int, seed: int, shuffle_buffer: int, urls: list[str]) -> None:
    """The saved position only means the same samples under the same stream definition."""
    now = {"batch_size": batch_size, "seed": seed, "shuffle_buffer": shuffle_buffer, "urls": [Path(u).name for u in urls]}
    changed = [k for k in now if state.get(k) != now[k]]
    if changed:
        raise UserError(f"cannot resume the data stream exactly: {', '.join(changed)} changed since the checkpoint "
                         f"(was {[state.get(k) for k in changed]}, now {[now[k] for k in changed]}); "
                         "restore them, or start a new run in a new output_dir")


def make_loader(urls: list[str], vocab: Vocab, batch_size: int, rank: int, world_size: int, seed: int,
                shuffle_buffer: int, num_workers: int, start: int = 0,
                expected: dict[str, int] | None = None) -> BatchStream:
    return BatchStream(ShardLoader(urls, vocab, batch_size, rank, world_size, seed, shuffle_buffer, num_workers, start,
                                   expected))


def expected_counts(shards_dir: Path, manifest: dict) -> dict[str, int]:
    """url -> samples, as `shard_urls` names the shards, for the loader's truncation check."""
    return {str(shards_dir / s["name"]): s["sequences"] for split in manifest["splits"].values() for s in split["shards"]}
