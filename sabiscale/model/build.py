"""Build a Llama-style causal LM from the run config (random init) and run it over packed batches.
Maps tokens to hidden states and logits, nothing else: masking, selection and parallelism live
outside (loss/, train/), FLOP accounting in track/flops.py.

Documents packed into one sequence never attend to each other: sabiscale's per-document attention
(model/attention.py) computes only inside each document, from the restarting `position_ids`.
It needs caching off: with a cache, transformers silently lets packed documents attend to each
other. Calls that are not packed training batches (generation) use plain sdpa.
"""
from __future__ import annotations

import contextlib
import zlib

import torch
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sabiscale.model import attention
from sabiscale.model import layer as layer_ops
from sabiscale.config import ModelConfig


def llama_config(cfg: ModelConfig, vocab_size: int, max_len: int, pad_id: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max_len,
        rope_theta=cfg.rope_theta,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        use_cache=False,
        attn_implementation=attention_implementation(),
    )


def attention_implementation() -> str:
    """Always sabiscale's: it keeps packed documents apart itself and picks flash-attention's
    varlen kernel per call where that can run (transformers' own flash_attention_2 would mix the
    documents of a batch of several rows, and rejects fp32 calls such as eval and scoring)."""
    return attention.NAME


def build_model(cfg: ModelConfig, vocab_size: int, max_len: int, pad_id: int, eos_id: int, seed: int,
                gathered=None) -> LlamaForCausalLM:
    """fp32 model with init_parameters' weights. _from_config, not the constructor: under DeepSpeed
    ZeRO-3 (train/engine.py::model_construction) it builds each rank's partition only, and
    `gathered(param)` then gives a context in which that parameter is whole."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(llama_config(cfg, vocab_size, max_len, pad_id, eos_id), dtype=torch.float32)
    init_parameters(model, seed, gathered)
    return model


@torch.no_grad()
def init_parameters(model: LlamaForCausalLM, seed: int, gathered=None) -> None:
    """Llama's init (weights ~ N(0, initializer_range), the padding embedding 0, norms 1), each
    parameter from its own generator seeded by the run seed and the parameter's name. The values
    do not depend on the order modules are built or initialized in, so a model built whole and one
    built in ZeRO-3 partitions (whose construction draws no random numbers) start identical."""
    std = model.config.initializer_range
    seen: set[int] = set()  # tied weights are initialized once, as the module that owns them first
    for name, module in model.named_modules():
        for attr, param in module.named_parameters(prefix=name, recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            with gathered(param) if gathered is not None else contextlib.nullcontext():
                if param.numel() == 0:  # ZeRO-3 partition on a rank that does not modify it
                    continue
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(attr.encode()))
                    param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))
                    if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                        param[module.padding_idx].zero_()
                else:
                    param.fill_(1.0)  # RMSNorm scales


def inference_dtype(device_type: str, bf16_supported: bool = False) -> torch.dtype:
    """The dtype eval, scoring, the online reference and generation run in: a GPU's compute dtype
    (bf16 where it has native bf16, fp16 before), as training there; fp32 on the CPU (bf16 there is
    only faster for wide models, and these passes are short). Logits go through the loss in fp32
    either way (loss/head.py)."""
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if bf16_supported else torch.float16


def for_inference(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` on `device` in its inference dtype, in eval mode; on CUDA, what stays fp32 (the
    loss head's accumulations) may use TF32 tensor cores."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return module.to(device=device, dtype=inference_dtype(device.type, bf16)).eval()


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also once ZeRO-3 has partitioned it away (its data is then empty)."""
    return getattr(p, "ds_numel", p.numel())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(numel(p) for p in model.parameters())


# Attention implementations that keep packed documents apart from position_ids alone, with no mask.
_MASK_FREE_PACKING = {attention.NAME}


def hidden_at(lm: LlamaForCausalLM, input_ids: torch.Tensor, position_ids: torch.Tensor,
              needed: torch.Tensor, kernels: layer_ops.Kernels | None = layer_ops.EAGER) -> torch.Tensor:
    """Final hidden states of a packed batch at the `needed` (B, T) positions only, as (N, hidden).

    Every layer but the last runs on every position: later positions of a document attend to
    them. The last layer's keys and values are needed everywhere too, but its queries' outputs
    only where the head reads them: its attention output projection, MLP and the final norm
    run on the needed positions alone (about half the tokens with the prompt-masked loss), so
    compute is not spent on positions whose last-layer output nothing reads. Same values as
    `lm.model(...).last_hidden_state[needed]` (tests/test_loss.py compares with full logits).

    kernels: the layers run fused (model/layer.py) with these elementwise kernels, eager or
    compiled; None runs them as transformers' modules (also what ZeRO-3 needs).
    """
    body = lm.model
    impl = body.config._attn_implementation
    if impl not in _MASK_FREE_PACKING:
        full = body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return full[needed]
    x = body.embed_tokens(input_ids)
    rope = body.rotary_emb(x, position_ids=position_ids)
    # every layer attends inside the same documents: the varlen metadata or the sdpa buckets, once
    plan = attention.document_plan(position_ids, x.dtype) if impl == attention.NAME else None
    packed = {"position_ids": position_ids, "packed_documents": True, "document_plan": plan}
    *layers, last = body.layers
    if kernels is None or not layer_ops.fusable(last):
        for layer in layers:
            x = layer(x, attention_mask=None, position_embeddings=rope, **packed)
        return body.norm(_module_last_layer(last, x, rope, packed, needed))
    for layer in layers:
        if layer.gradient_checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer_ops.decoder_layer, layer, x, rope, packed, kernels, use_reentrant=False)
        else:
            x = layer_ops.decoder_layer(layer, x, rope, packed, kernels)
    y = layer_ops.last_layer(last, x, rope, packed, needed, kernels)
    return layer_ops.rms_norm(y, body.norm.weight, body.norm.variance_epsilon)


def _module_last_layer(last, x: torch.Tensor, rope, packed: dict, needed: torch.Tensor) -> torch.Tensor:
    """hidden_at's last layer through the layer's own modules (each call gathers its parameters
    under ZeRO-3)."""
    attn = last.self_attn
    h = last.input_layernorm(x)
    heads = (*h.shape[:-1], -1, attn.head_dim)
    q, k, v = (proj(h).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *rope)
    y = x[needed] + attn.o_proj(layer_ops.attention(last, q, k, v, packed)[needed])
    return y + last.mlp(last.post_attention_layernorm(y))
