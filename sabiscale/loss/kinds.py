"""The loss kinds: which next-token targets of a micro-batch count, and how the head turns them
into a loss. One class per kind, registered by name; `loss.kind` in a recipe picks one, once, when
the objective is built. Adding a kind is one class here (and its test): the config accepts every
registered name, and the objective, the loop and the metrics ask the kind, never its name.

    masked     SabiYarn: only answer tokens (and each answer's end of text) count; with
               loss.prompt_weight > 0 the prompt tokens count too, with that weight
    clm        every real token that something in its document predicts
    selective  Rho-1: of the answer tokens of each micro-batch, the `loss.ratio` share with the
               highest excess loss (current minus a reference model's loss); with
               loss.selection=sample, that share drawn with odds exp(excess / loss.temperature)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from sabiscale.errors import UserError
from sabiscale.loss.head import SupervisedHead, selected_count


@dataclass
class HeadLoss:
    loss_sum: torch.Tensor              # () weighted sum of the kept targets' losses; carries the gradient
    losses: torch.Tensor                # (K,) detached, unweighted loss of each kept target
    keep: torch.Tensor | None = None    # (C,) bool, which candidates were kept (None: all of them)
    excess: torch.Tensor | None = None  # (C,) the candidates' excess losses, when the kind ranks them


class LossKind:
    """Default behaviour: every candidate target counts, with its (task-weighted) loss."""

    name: ClassVar[str]
    reads_reference: ClassVar[bool] = False  # needs each token's reference loss (shards or online)
    selects: ClassVar[bool] = False          # keeps a share of its candidates (selection metrics are logged)

    def __init__(self, cfg) -> None:  # cfg: sabiscale.config.LossConfig
        self.cfg = cfg

    @staticmethod
    def problems(cfg) -> list[str]:
        """What is wrong with the loss section for this kind (checked when the recipe loads)."""
        return []

    def check_shards(self, manifest: dict, shards_dir: Path) -> None:
        """Refuse shards this kind cannot train from, before the engine starts."""

    def candidates(self, input_ids: torch.Tensor, position_ids: torch.Tensor, loss_mask: torch.Tensor,
                   pad_id: int) -> torch.Tensor:
        """(B, T-1) bool: the next-token targets this kind may count."""
        raise NotImplementedError

    def counted(self, candidates: int) -> int:
        """How many targets a micro-batch with this many candidates counts, known before any forward."""
        return candidates

    def target_weights(self, loss_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, T-1) weight of each candidate's loss, or None when every candidate weighs 1."""
        return None

    def head_loss(self, head: SupervisedHead, hidden: torch.Tensor, targets: torch.Tensor,
                  token_weights: torch.Tensor | None, chunk: int, reference: torch.Tensor | None,
                  draw_seed: int | None = None) -> HeadLoss:
        """draw_seed: the seed of this micro-batch's random draws (draw_seed()), for kinds that draw."""
        loss_sum, losses = head(hidden, targets=targets, token_weights=token_weights, chunk=chunk)
        return HeadLoss(loss_sum, losses)


LOSS_KINDS: dict[str, type[LossKind]] = {}


def draw_seed(seed: int, micro_batch: int) -> int:
    """The seed of one micro-batch's random draws: a function of the run's seed and the micro-batch's
    place in the global stream only, so a micro-batch draws the same on any number of ranks and
    after a resume. SeedSequence mixes the two, so neighbouring micro-batches are not correlated."""
    return int(np.random.SeedSequence([seed, micro_batch]).generate_state(1)[0])


def gumbel_noise(count: int, seed: int, device: torch.device) -> torch.Tensor:
    """(count,) standard Gumbel draws: the top-k of logits + Gumbel noise is a draw of k items
    without replacement with probabilities softmax(logits) (the Gumbel-top-k trick)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    uniform = torch.rand(count, generator=generator, device=device).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


def register(kind: type[LossKind]) -> type[LossKind]:
    LOSS_KINDS[kind.name] = kind
    return kind


@register
class Masked(LossKind):
    name = "masked"

    @property
    def prompt_weight(self) -> float:
        return float(getattr(self.cfg, "prompt_weight", 0.0))

    def candidates(self, input_ids, position_ids, loss_mask, pad_id):
        if self.prompt_weight > 0:  # prompt tokens count too: every real, predicted token
            return (position_ids[:, 1:] != 0) & (input_ids[:, 1:] != pad_id)
        return loss_mask[:, 1:]

    def target_weights(self, loss_mask):
        if self.prompt_weight == 0 or self.prompt_weight == 1:
            return None
        answer = loss_mask[:, 1:]
        return torch.where(answer, torch.ones((), device=answer.device),
                           torch.full((), self.prompt_weight, device=answer.device))


@register
class CausalLM(LossKind):
    """Every real token that is not the first of its document (nothing in its document predicts
    it) and is not padding."""

    name = "clm"

    @staticmethod
    def problems(cfg) -> list[str]:
        if cfg.prompt_weight:
            return ["loss.prompt_weight applies to loss.kind=masked (kind clm counts every token with weight 1)"]
        return []

    def candidates(self, input_ids, position_ids, loss_mask, pad_id):
        return (position_ids[:, 1:] != 0) & (input_ids[:, 1:] != pad_id)


@register
class Selective(Masked):
    """Selection is per micro-batch, among its answer tokens: a micro-batch is the unit of the
    world-size-invariant data stream, so a selective run picks the same tokens on 1 rank with
    accumulation as on many ranks, and no collective is needed inside the forward."""

    name = "selective"
    reads_reference = True
    selects = True

    @property
    def prompt_weight(self) -> float:
        return 0.0  # selection is among answer tokens

    @staticmethod
    def problems(cfg) -> list[str]:
        problems = []
        if cfg.reference == "online" and cfg.reference_checkpoint is None:
            problems.append("loss.reference is 'online' but loss.reference_checkpoint is not set")
        if cfg.prompt_weight:
            problems.append("loss.prompt_weight applies to loss.kind=masked; the selective loss selects among "
                            "answer tokens (set loss.prompt_weight=0)")
        return problems

    def check_shards(self, manifest, shards_dir):
        if self.cfg.reference == "shards" and "reference" not in manifest:
            raise UserError(
                f"loss.kind=selective reads reference losses from the shards, but {shards_dir} has none; score "
                f"them: `sabiscale score --reference REF_CHECKPOINT --shards {shards_dir} --out NEW_DIR` and set "
                "data.shards_dir=NEW_DIR (or set loss.reference=online with loss.reference_checkpoint)")

    def counted(self, candidates):
        return selected_count(candidates, self.cfg.ratio)

    def head_loss(self, head, hidden, targets, token_weights, chunk, reference, draw_seed=None):
        if reference is None:
            raise UserError("the selective loss needs reference losses: train from shards written by "
                            "`sabiscale score`, or set loss.reference=online")
        noise = None
        if self.cfg.selection == "sample":
            if draw_seed is None:
                raise ValueError("loss.selection=sample draws per micro-batch: pass its draw_seed")
            # ranking excess + T x Gumbel = ranking excess / T + Gumbel: odds exp(excess / T)
            noise = self.cfg.temperature * gumbel_noise(len(reference), draw_seed, hidden.device)
        loss_sum, losses, keep, excess = head(hidden, targets=targets, token_weights=token_weights, chunk=chunk,
                                              reference=reference, ratio=self.cfg.ratio, noise=noise)
        return HeadLoss(loss_sum, losses, keep, excess)


def make_loss_kind(cfg) -> LossKind:
    """The kind a loss config names (cfg: sabiscale.config.LossConfig)."""
    if cfg.kind not in LOSS_KINDS:
        raise UserError(f"loss.kind {cfg.kind!r} is not one of {sorted(LOSS_KINDS)}")
    return LOSS_KINDS[cfg.kind](cfg)
