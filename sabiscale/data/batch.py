"""The Batch contract between the loader and the loss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    input_ids: torch.Tensor     # (B, T) int64
    loss_mask: torch.Tensor     # (B, T) bool, True = this token is a supervised target
    position_ids: torch.Tensor  # (B, T) int64, restarts at 0 per packed document
    docs: list[list[list]]      # per sequence: [start, length, task, lang] per document
    index: int = 0              # position of this micro-batch in the global batch stream

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.loss_mask.to(device), self.position_ids.to(device),
                     self.docs, self.index)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def supervised_targets(self) -> int:
        return int(target_mask(self).sum())


def target_mask(batch: Batch) -> torch.Tensor:
    """(B, T-1) bool: which next-token targets count. Position t predicts token t+1, so the mask is
    the target's `loss_mask`; a document's first token is never a target (set at packing)."""
    return batch.loss_mask[:, 1:]


def collate(samples: list[dict], index: int) -> Batch:
    stack = lambda key, dtype: torch.from_numpy(np.stack([s[key] for s in samples]).astype(dtype))  # noqa: E731
    return Batch(
        input_ids=stack("input_ids", np.int64),
        loss_mask=stack("loss_mask", np.bool_),
        position_ids=stack("position_ids", np.int64),
        docs=[s["docs"] for s in samples],
        index=index,
    )
