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


# Dense peak FLOP/s of common GPUs from their data sheets (bf16/fp16: tensor cores with fp32
# accumulation; fp32: without TF32), the denominator of MFU on CUDA: a measured matmul peak runs
# below the spec and would flatter MFU. Longer names first ("H100 PCIe" before "H100", the SXM).
GPU_SPEC_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
)


def spec_peak(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of a GPU by its name (torch.cuda.get_device_name) and the run's
    precision, or None for a device not in the table (then train.peak_flops_per_s, or a measured
    peak)."""
    for key, peaks in GPU_SPEC_PEAKS:
        if key in device_name:
            return peaks.get(precision)
    return None
