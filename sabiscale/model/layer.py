"""One Llama decoder layer over a packed training batch, with fewer, larger matmuls and
(optionally) compiled elementwise work. Same values as transformers' LlamaDecoderLayer.

- Fused projections: q, k and v come from one matmul against the three weights stacked, gate
  and up from one against theirs, and the results are split after the matmul. The parameters
  themselves stay the separate Llama ones (`q_proj.weight`, ...): checkpoints, DeepSpeed's
  ZeRO partitions and universal checkpoints, and the Hugging Face export keep the standard
  layout with nothing to convert. The stacking copies the weights once per call (hidden x 3
  hidden floats), small next to the matmul over every token of the batch, and its backward only
  splits the weight gradient.
- Compiled kernels (train.compile): the work before attention (norm, q/k/v, rotary positions)
  and after it (output projection, residuals, norm, SwiGLU MLP) are torch.compile'd as pure
  functions of tensors, the weights passed in, so DeepSpeed's module hooks stay outside the
  compiled code and the same functions serve ZeRO-1/2 and activation checkpointing.

Under ZeRO-3 a parameter is whole only while its own module runs (DeepSpeed gathers it in that
module's forward hook), so reading `q_proj.weight` from outside would see an empty partition:
there the layer runs as transformers' module calls (`fusable` says which).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: in fp32, scaled by the weight after casting back."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def qkv_rope(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, q_w: torch.Tensor, k_w: torch.Tensor,
             v_w: torch.Tensor, head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """Norm, q/k/v in one matmul, rotary positions: (B, heads, T, head_dim) each."""
    h = rms_norm(x, norm_weight, eps)
    qkv = F.linear(h, torch.cat([q_w, k_w, v_w]))
    heads = (*h.shape[:-1], -1, head_dim)
    q, k, v = (part.reshape(heads).transpose(1, 2) for part in qkv.split([len(q_w), len(k_w), len(v_w)], dim=-1))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def out_mlp(x: torch.Tensor, attn_out: torch.Tensor, o_w: torch.Tensor, norm_weight: torch.Tensor, eps: float,
            gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """Attention output projection and residual, then the MLP block (gate and up in one matmul)
    and its residual."""
    y = x + F.linear(attn_out, o_w)
    gate, up = F.linear(rms_norm(y, norm_weight, eps), torch.cat([gate_w, up_w])).chunk(2, dim=-1)
    return y + F.linear(F.silu(gate) * up, down_w)


@dataclass(frozen=True)
class Kernels:
    qkv_rope: Callable   # every layer, on all B x T positions
    out_mlp: Callable    # every layer but the last, on all B x T positions
    compiled: bool


EAGER = Kernels(qkv_rope, out_mlp, compiled=False)
_compiled: list[Kernels] = []


def compiled_kernels() -> Kernels:
    """The full-batch kernels through torch.compile (inductor: C++ on the CPU, Triton on GPUs),
    built once per process; each compiles at its first call. Shapes are static there (micro-batch x
    sequence length): compiled for dynamic shapes the same code measured slower than eager on the
    CPU, so the last layer's N-position part, whose N changes every batch, and the final norm on
    those positions always run eager."""
    if not _compiled:
        _compiled.append(Kernels(torch.compile(qkv_rope, dynamic=False), torch.compile(out_mlp, dynamic=False),
                                 compiled=True))
    return _compiled[0]


def fusable(layer) -> bool:
    """False under ZeRO-3, whose parameters are whole only inside their own module's call, and for
    projections with biases (sabiscale's Llama has none)."""
    zero3 = any(hasattr(p, "ds_id") for p in layer.parameters())
    return not zero3 and all(m.bias is None for m in layer.modules() if isinstance(m, torch.nn.Linear))


def attention_inputs(layer, x: torch.Tensor, rope, kernels: Kernels):
    attn, norm = layer.self_attn, layer.input_layernorm
    return kernels.qkv_rope(x, norm.weight, norm.variance_epsilon, attn.q_proj.weight, attn.k_proj.weight,
                            attn.v_proj.weight, attn.head_dim, *rope)


def output_and_mlp(layer, x: torch.Tensor, attn_out: torch.Tensor, kernel: Callable) -> torch.Tensor:
    mlp, norm = layer.mlp, layer.post_attention_layernorm
    return kernel(x, attn_out, layer.self_attn.o_proj.weight, norm.weight, norm.variance_epsilon,
                  mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


def attention(layer, q, k, v, packed: dict) -> torch.Tensor:
    """(B, T, heads * head_dim) output of the configured attention implementation, before o_proj."""
    attn = layer.self_attn
    out, _ = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation](attn, q, k, v, None, dropout=0.0,
                                                                       scaling=attn.scaling, **packed)
    return out.reshape(*q.shape[:1], q.shape[2], -1)


def decoder_layer(layer, x: torch.Tensor, rope, packed: dict, kernels: Kernels) -> torch.Tensor:
    """LlamaDecoderLayer.forward on a packed batch, fused."""
    q, k, v = attention_inputs(layer, x, rope, kernels)
    return output_and_mlp(layer, x, attention(layer, q, k, v, packed), kernels.out_mlp)


def last_layer(layer, x: torch.Tensor, rope, packed: dict, needed: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """The last layer at the `needed` positions only, as (N, hidden): its keys and values come
    from every position, but o_proj and the MLP run where the head reads the output."""
    q, k, v = attention_inputs(layer, x, rope, kernels)
    return output_and_mlp(layer, x[needed], attention(layer, q, k, v, packed)[needed], out_mlp)
