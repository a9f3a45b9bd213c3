"""Prompt-masked (SabiYarn) and all-token (CLM) next-token loss, paying the head only where it counts.

HF-style training builds (B, T, V) logits and hides prompt tokens with labels=-100. Here the final
hidden states are gathered at the supervised positions first, and the output projection plus
cross-entropy run only there, chunk by chunk under activation checkpointing, so at most
(chunk, V) logits are alive at once and no B x T x V tensor exists.

The objective returns a *sum* and a *count*; the training loop divides once by the global count of
supervised tokens, so the result does not depend on micro-batching or the number of ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint



def _head_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_head_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of cross-entropy of head(hidden) vs targets; hidden (N, H), targets (N,)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_ce_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, h, t)
    return total


def target_selection(batch_mask: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     kind: str, pad_id: int) -> torch.Tensor:
    """(B, T-1) bool: the next-token targets the loss counts.

    masked: the packed loss_mask (answer tokens and EOS). clm: every real token that is not the
    first of its document (nothing in its document predicts it) and not padding.
    """
    if kind == "masked":
        return batch_mask[:, 1:]
    return (position_ids[:, 1:] != 0) & (input_ids[:, 1:] != pad_id)


class TokenLossObjective(torch.nn.Module):
    """Wraps a causal LM; forward returns (loss_sum, n_targets) for one micro-batch."""

    def __init__(self, lm: torch.nn.Module, kind: str, chunk_size: int, pad_id: int) -> None:
        super().__init__()
        self.lm, self.kind, self.chunk_size, self.pad_id = lm, kind, chunk_size, pad_id

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor,
                kind: str | None = None):
        """kind overrides the training kind, e.g. "masked" to measure answer-token loss of a CLM run."""
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        selected = target_selection(loss_mask, input_ids, position_ids, kind or self.kind, self.pad_id)  # (B, T-1)
        h = hidden[:, :-1][selected]        # (N, H)
        targets = input_ids[:, 1:][selected]  # (N,)
        loss_sum = chunked_head_loss(self.lm.lm_head, h, targets, self.chunk_size)
        return loss_sum, selected.sum()
