"""The objective: a causal LM plus a loss kind, returning the sum and the count of one
micro-batch's token losses.

The final hidden states are computed at the supervised positions only (the last layer's output
projection, MLP and final norm run there alone, sabiscale/model/build.py::hidden_at), and the head
(loss/head.py) reads only them. The objective returns a *sum* and a *count*; the training loop
divides once by the global count of supervised tokens, so the result does not depend on
micro-batching or the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sabiscale.loss.head import install_supervised_head
from sabiscale.loss.kinds import LossKind, make_loss_kind
from sabiscale.model import layer as layer_ops
from sabiscale.model.build import hidden_at


@dataclass
class TokenLosses:
    loss_sum: torch.Tensor   # () weighted sum of the selected tokens' losses; carries the gradient
    count: torch.Tensor      # () number of selected target tokens
    per_token: torch.Tensor  # (N,) detached, unweighted loss of each selected target
    selected: torch.Tensor   # (B, T-1) bool, which next-token targets were selected
    # kinds that rank candidates (selective): the candidates (B, T-1) and their excess losses (C,), detached
    candidates: torch.Tensor | None = None
    excess: torch.Tensor | None = None


def loss_kind(kind: str | LossKind, ratio: float = 1.0) -> LossKind:
    """A kind by name (with the selective ratio), or the kind itself."""
    if isinstance(kind, LossKind):
        return kind
    from sabiscale.config import LossConfig

    return make_loss_kind(LossConfig(kind=kind, ratio=ratio))


class TokenLossObjective(torch.nn.Module):
    """Wraps a causal LM; forward returns the TokenLosses of one micro-batch."""

    def __init__(self, lm: torch.nn.Module, kind: str | LossKind, chunk_size: int, pad_id: int,
                 task_weights: list[float] | None = None, ratio: float = 1.0,
                 kernels: layer_ops.Kernels | None = layer_ops.EAGER) -> None:
        super().__init__()
        self.kernels = kernels  # how the decoder layers run: model/layer.py (None: transformers' modules)
        self.lm = install_supervised_head(lm)
        self.kind = loss_kind(kind, ratio)
        self.chunk_size, self.pad_id = chunk_size, pad_id
        # index = task id of the run's Vocab; None = every task weighs 1
        self.task_weights = task_weights
        self._measures: dict[str, LossKind] = {}  # other kinds, to measure with (e.g. masked eval of a CLM run)

    def _weights(self, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        if self.task_weights is None or task_ids is None:
            return None
        table = torch.tensor([*self.task_weights, 0.0], device=task_ids.device)  # id -1 (padding) -> 0
        return table[task_ids[:, 1:]]  # (B, T-1)

    def _kind(self, measure: str | None) -> LossKind:
        if measure is None:
            return self.kind
        if measure not in self._measures:
            self._measures[measure] = loss_kind(measure)
        return self._measures[measure]

    def select(self, input_ids, position_ids, loss_mask, task_ids=None, kind: str | None = None):
        """((B, T-1) bool targets, (B, T-1) weights or None); an explicit kind ignores task weights."""
        selected = self._kind(kind).candidates(input_ids, position_ids, loss_mask, self.pad_id)
        weights = self._weights(task_ids) if kind is None else None
        if weights is not None:
            selected = selected & (weights > 0)
        prompt = self.kind.target_weights(loss_mask) if kind is None else None
        if prompt is not None:
            weights = prompt if weights is None else weights * prompt
        return selected, weights

    def count_targets(self, input_ids, position_ids, loss_mask, task_ids=None) -> torch.Tensor:
        """How many targets forward() will count, without running the model."""
        candidates = self.select(input_ids, position_ids, loss_mask, task_ids)[0].sum()
        return torch.tensor(self.kind.counted(int(candidates)), device=candidates.device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor,
                task_ids: torch.Tensor | None = None, ref_loss: torch.Tensor | None = None,
                kind: str | None = None, draw_seed: int | None = None) -> TokenLosses:
        """kind measures with another kind than the training one, e.g. "masked" for the answer-token
        loss of a CLM run. ref_loss (B, T): the reference model's loss of each token, for kinds
        that read it. draw_seed: the micro-batch's seed for kinds that draw (kinds.draw_seed)."""
        measure = self._kind(kind)
        selected, weights = self.select(input_ids, position_ids, loss_mask, task_ids, kind)
        needed = torch.cat([selected, selected.new_zeros(selected.shape[0], 1)], dim=1)  # position t predicts t+1
        h = hidden_at(self.lm, input_ids, position_ids, needed, self.kernels)  # (N, H), in the order of [selected]
        targets = input_ids[:, 1:][selected]  # (N,)
        token_weights = weights[selected].float() if weights is not None else None
        reference = ref_loss[:, 1:][selected].float() if measure.reads_reference and ref_loss is not None else None
        out = measure.head_loss(self.lm.lm_head, h, targets, token_weights, self.chunk_size, reference, draw_seed)
        if out.keep is None:
            return TokenLosses(out.loss_sum, selected.sum(), out.losses, selected)
        chosen = torch.zeros_like(selected)
        chosen[selected] = out.keep
        return TokenLosses(out.loss_sum, out.keep.sum(), out.losses, chosen, candidates=selected, excess=out.excess)
