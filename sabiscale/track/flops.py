"""FLOPs a training step needs and executes, for MFU (train/mfu and the benchmarks).

"Needed" counts what the work itself requires (the body on real tokens, the head only where it
reads, attention only inside documents); "executed" adds what sabiscale runs anyway (padding, the
padded attention buckets of model/attention.py). tests/test_loss.py checks `needed` against
PyTorch's FLOP counter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from sabiscale.model import attention
from sabiscale.model.build import numel


@dataclass(frozen=True)
class StepCost:
    """Forward + backward FLOPs per unit of work: 6 per weight a token passes through (2 forward,
    4 backward), 12 * hidden per layer for each causal query-key pair (scores and weighted values)."""

    body: float       # per position: every decoder layer's weights
    tail: float       # per position, the part of `body` only needed where the head reads: the last
                      # layer's attention output projection and MLP (hidden_at skips it elsewhere)
    attention: float  # per query-key pair inside a document, all layers
    head: float       # per position the head reads: the output projection

    def needed(self, doc_lengths: torch.Tensor, read: int) -> float:
        """What a step must compute: body on every real token, tail and head where the head reads,
        attention inside each document (a document of L tokens has L(L+1)/2 causal pairs)."""
        lengths = doc_lengths.double()
        pairs = float((lengths * (lengths + 1) / 2).sum())
        return (self.body - self.tail) * float(lengths.sum()) + (self.tail + self.head) * read + self.attention * pairs


def step_cost(model: LlamaForCausalLM) -> StepCost:
    cfg = model.config
    last = model.model.layers[-1]
    matmul_weights = lambda m: sum(numel(x.weight) for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    body = matmul_weights(model.model.layers)
    tail = matmul_weights(last.self_attn.o_proj) + matmul_weights(last.mlp)
    return StepCost(body=6.0 * body, tail=6.0 * tail, attention=12.0 * cfg.num_hidden_layers * cfg.hidden_size,
                    head=6.0 * cfg.vocab_size * cfg.hidden_size)


def batch_flops(cost: StepCost, position_ids: torch.Tensor, real: torch.Tensor, read: int) -> tuple[float, float]:
    """(needed, executed) FLOPs of one packed micro-batch whose head reads `read` positions.
    Executed: the body's first layers and the last layer's keys and values run on padding too,
    and attention runs on length buckets padded to their longest document (sabiscale/model/attention.py)."""
    starts, lengths = attention.document_spans(position_ids)
    needed = cost.needed(lengths[real.reshape(-1)[starts]], read)
    buckets = attention.bucket_plan(position_ids).shapes
    pairs = sum(n * longest * (longest + 1) / 2 for n, longest in buckets)
    executed = (cost.body - cost.tail) * position_ids.numel() + (cost.tail + cost.head) * read + cost.attention * pairs
    return needed, executed
