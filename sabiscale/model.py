"""Build a Llama-style causal LM from the run config (random init). Maps tokens to hidden states
and logits, nothing else: masking, selection and parallelism live outside.

Documents packed into one sequence never attend to each other. On a GPU with flash-attn
installed, flash-attention's varlen kernel does it from the restarting `position_ids`; elsewhere
sabiscale's per-document attention (sabiscale/attention.py) does, computing only inside each
document. Both need caching off: with a cache, transformers silently lets packed documents attend
to each other. Calls that are not packed training batches (generation) use plain sdpa.
"""
from __future__ import annotations

import importlib.util

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import attention
from .config import ModelConfig


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
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return attention.NAME


def build_model(cfg: ModelConfig, vocab_size: int, max_len: int, pad_id: int, eos_id: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # identical init on every rank and every run with this seed
    model = LlamaForCausalLM(llama_config(cfg, vocab_size, max_len, pad_id, eos_id))
    return model.float()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: LlamaForCausalLM, seq_len: int) -> tuple[int, int]:
    """(body FLOPs per token, head FLOPs per supervised token) for forward+backward (6N rule,
    plus attention scores 12*L*H*T), with the head counted apart because it runs only where the
    loss needs it."""
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    embed = cfg.vocab_size * cfg.hidden_size
    body_params = count_parameters(model) - embed - (0 if cfg.tie_word_embeddings else head)
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len // 2  # causal: half the scores
    return 6 * body_params + attention, 6 * head
