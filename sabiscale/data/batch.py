"""The Batch contract between the loader and the loss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sabiscale.errors import UserError


@dataclass
class Batch:
    input_ids: torch.Tensor     # (B, T) int64
    loss_mask: torch.Tensor     # (B, T) bool, True = this token is a supervised target
    position_ids: torch.Tensor  # (B, T) int64, restarts at 0 per packed document
    task_ids: torch.Tensor      # (B, T) int64, index into the run's task names; -1 = padding
    lang_ids: torch.Tensor      # (B, T) int64, index into the run's language codes; -1 = padding
    index: int = 0              # position of this micro-batch in the global micro-batch stream
    keys: tuple[str, ...] = ()  # WebDataset sample keys, for tracing which samples were trained on
    # (B, T) float32, a reference model's loss of each answer token (NaN elsewhere); from shards
    # scored by `sabiscale score`, for the selective loss
    ref_loss: torch.Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """On `device`; `non_blocking` copies from pinned memory overlap the GPU's work."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies (DataLoader(pin_memory=True) calls this in its pinning thread)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "Batch":
        move = lambda t: fn(t) if t is not None else None  # noqa: E731
        return Batch(move(self.input_ids), move(self.loss_mask), move(self.position_ids),
                     move(self.task_ids), move(self.lang_ids), self.index, self.keys, move(self.ref_loss))

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass(frozen=True)
class Vocab:
    """Task names and language codes of a run, in a fixed order (from the manifest)."""

    tasks: tuple[str, ...]
    langs: tuple[str, ...]

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Vocab":
        keys = [k for split in manifest["splits"].values() for k in split["counts"]["by_task_lang"]]
        return cls(tuple(sorted({k.split("/")[0] for k in keys})), tuple(sorted({k.split("/")[1] for k in keys})))


def _doc_index_array(docs: list[list], seq_len: int, column: int, names: tuple[str, ...]) -> np.ndarray:
    out = np.full(seq_len, -1, dtype=np.int64)
    lookup = {name: i for i, name in enumerate(names)}
    for doc in docs:
        start, length = doc[0], doc[1]
        out[start:start + length] = lookup.get(doc[column], -1)
    return out


def collate(samples: list[dict], index: int, vocab: Vocab) -> Batch:
    stack = lambda key, dtype: torch.from_numpy(np.stack([s[key] for s in samples]).astype(dtype))  # noqa: E731
    seq_len = len(samples[0]["input_ids"])
    task_ids = np.stack([_doc_index_array(s["docs"], seq_len, 2, vocab.tasks) for s in samples])
    lang_ids = np.stack([_doc_index_array(s["docs"], seq_len, 3, vocab.langs) for s in samples])
    scored = {"ref_loss" in s for s in samples}
    if len(scored) > 1:
        raise UserError(f"micro-batch {index} mixes samples with and without ref_loss ({[s['key'] for s in samples]}); "
                         "score every shard of the run with `sabiscale score`")
    return Batch(
        ref_loss=stack("ref_loss", np.float32) if scored == {True} else None,
        input_ids=stack("input_ids", np.int64),
        loss_mask=stack("loss_mask", np.bool_),
        position_ids=stack("position_ids", np.int64),
        task_ids=torch.from_numpy(task_ids),
        lang_ids=torch.from_numpy(lang_ids),
        index=index,
        keys=tuple(s["key"] for s in samples),
    )
