"""Prompt-masked (SabiYarn) and all-token (CLM) next-token loss, paying the head only where it counts.

HF-style training builds (B, T, V) logits and hides prompt tokens with labels=-100. Here the final
hidden states are gathered at the supervised positions first, and the output projection plus
cross-entropy run only there, chunk by chunk under activation checkpointing, so at most
(chunk, V) logits are alive at once and no B x T x V tensor exists. The head is called as a
module, so under ZeRO-3 DeepSpeed gathers its weight as for any forward.

The objective returns a *sum* and a *count*; the training loop divides once by the global count of
supervised tokens, so the result does not depend on micro-batching or the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class TokenLosses:
    loss_sum: torch.Tensor   # () weighted sum of the selected tokens' losses; carries the gradient
    count: torch.Tensor      # () number of selected target tokens
    per_token: torch.Tensor  # (N,) detached, unweighted loss of each selected target
    selected: torch.Tensor   # (B, T-1) bool, which next-token targets were selected


def _head_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V)
    return F.cross_entropy(logits, targets, reduction="none")


def chunked_head_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N,) cross-entropy of head(hidden) vs targets; hidden (N, H). Logits live one chunk at a time."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_head_ce, head, h, t, use_reentrant=False))
        else:
            pieces.append(_head_ce(head, h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def target_selection(loss_mask: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     kind: str, pad_id: int) -> torch.Tensor:
    """(B, T-1) bool: the next-token targets the loss counts.

    masked: the packed loss_mask (answer tokens and EOS). clm: every real token that is not the
    first of its document (nothing in its document predicts it) and not padding.
    """
    if kind == "masked":
        return loss_mask[:, 1:]
    return (position_ids[:, 1:] != 0) & (input_ids[:, 1:] != pad_id)


class TokenLossObjective(torch.nn.Module):
    """Wraps a causal LM; forward returns the TokenLosses of one micro-batch."""

    def __init__(self, lm: torch.nn.Module, kind: str, chunk_size: int, pad_id: int,
                 task_weights: list[float] | None = None) -> None:
        super().__init__()
        self.lm, self.kind, self.chunk_size, self.pad_id = lm, kind, chunk_size, pad_id
        # index = task id of the run's Vocab; None = every task weighs 1
        self.task_weights = task_weights

    def _weights(self, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        if self.task_weights is None or task_ids is None:
            return None
        table = torch.tensor([*self.task_weights, 0.0], device=task_ids.device)  # id -1 (padding) -> 0
        return table[task_ids[:, 1:]]  # (B, T-1)

    def select(self, input_ids, position_ids, loss_mask, task_ids=None, kind: str | None = None):
        """((B, T-1) bool targets, (B, T-1) weights or None); an explicit kind ignores task weights."""
        selected = target_selection(loss_mask, input_ids, position_ids, kind or self.kind, self.pad_id)
        weights = self._weights(task_ids) if kind is None else None
        if weights is not None:
            selected = selected & (weights > 0)
        return selected, weights

    def count_targets(self, input_ids, position_ids, loss_mask, task_ids=None) -> torch.Tensor:
        """How many targets forward() will count, without running the model."""
        return self.select(input_ids, position_ids, loss_mask, task_ids)[0].sum()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor,
                task_ids: torch.Tensor | None = None, kind: str | None = None) -> TokenLosses:
        """kind overrides the training kind, e.g. "masked" to measure answer-token loss of a CLM run."""
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        selected, weights = self.select(input_ids, position_ids, loss_mask, task_ids, kind)
        h = hidden[:, :-1][selected]          # (N, H)
        targets = input_ids[:, 1:][selected]  # (N,)
        losses = chunked_head_losses(self.lm.lm_head, h, targets, self.chunk_size)
        weighted = losses * weights[selected] if weights is not None else losses
        return TokenLosses(weighted.sum(), selected.sum(), losses.detach(), selected)
