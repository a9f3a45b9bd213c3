"""The decoder layers as sabiscale runs them (model/layer.py): fused projections and compiled
kernels against transformers' own modules, in values, gradients and 20 steps of real training."""
import pytest
import torch

from sabiscale.model import layer as layer_ops
from sabiscale.model.build import build_model, hidden_at
from sabiscale.train.device import choose_compile
from test_engine import _train_in_process


def _model(demo_cfg, tok):
    return build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)


def _hidden_and_grads(lm, batch, needed, kernels):
    lm.zero_grad()
    h = hidden_at(lm, batch.input_ids, batch.position_ids, needed, kernels)
    (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()  # every output feature weighs differently
    return h.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def test_fused_and_compiled_layers_equal_transformers_modules(demo_cfg, parts):
    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    needed = batch.loss_mask.clone()
    assert 0 < int(needed.sum()) < needed.numel()
    ref, ref_grads = _hidden_and_grads(lm, batch, needed, None)
    for kernels in (layer_ops.EAGER, layer_ops.compiled_kernels()):
        h, grads = _hidden_and_grads(lm, batch, needed, kernels)
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys() and any("q_proj" in n for n in grads)
        for name, grad in grads.items():
            # summation order differs (one matmul instead of three): tolerance relative to the largest entry
            scale = float(ref_grads[name].abs().max())
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name} (compiled={kernels.compiled}): {m}")


def test_fused_projections_keep_the_llama_parameters(demo_cfg, parts):
    tok, _, _ = parts
    names = {n for n, _ in _model(demo_cfg, tok).named_parameters()}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{proj}.weight" in names
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{proj}.weight" in names
    assert not any("qkv" in n or "gate_up" in n for n in names)


def test_compile_and_fused_projections_keep_the_20_step_loss(demo_cfg, world, tmp_path):
    steps = {"train.max_steps": 20}
    modules = _train_in_process(demo_cfg, world, tmp_path / "modules", {**steps, "train.fused_projections": False,
                                                                         "train.compile": "off"})
    variants = {
        "fused": {"train.compile": "off"},
        "compiled": {"train.compile": "on"},
        "compiled, activation checkpointing": {"train.compile": "on", "train.activation_checkpointing": True},
    }
    assert len(modules.train_losses) == 20
    for name, overrides in variants.items():
        run = _train_in_process(demo_cfg, world, tmp_path / name.replace(", ", "-"), {**steps, **overrides})
        assert run.train_losses == pytest.approx(modules.train_losses, rel=1e-4), name


@pytest.mark.parametrize("requested,device,capability,expected", [
    ("auto", "cpu", None, False),        # measured: the gain pays back the compilation only in long runs
    ("auto", "cuda", (8, 0), True),
    ("auto", "cuda", (7, 0), True),
    ("auto", "cuda", (6, 1), False),     # older than Triton's oldest target
    ("on", "cpu", None, True),
    ("off", "cuda", (9, 0), False),
])
def test_compile_choice_follows_the_device(requested, device, capability, expected):
    assert choose_compile(requested, device, capability) is expected


def test_compile_on_without_fused_projections_is_refused(demo_cfg, world, tmp_path):
    from sabiscale.errors import UserError

    with pytest.raises(UserError, match="train.compile=on needs train.fused_projections=true"):
        _train_in_process(demo_cfg, world, tmp_path / "x", {"train.compile": "on", "train.fused_projections": False})


def test_activation_checkpointing_recomputes_the_fused_layers_in_backward(demo_cfg, parts, monkeypatch):
    from sabiscale.train.run import enable_activation_checkpointing

    tok, batch, vocab = parts
    lm = _model(demo_cfg, tok)
    calls = []
    original = layer_ops.decoder_layer
    monkeypatch.setattr(layer_ops, "decoder_layer", lambda *a, **k: calls.append(1) or original(*a, **k))
    needed = batch.loss_mask.clone()

    def forward_backward():
        calls.clear()
        hidden_at(lm, batch.input_ids, batch.position_ids, needed, layer_ops.EAGER).sum().backward()
        return len(calls)

    layers_but_last = lm.config.num_hidden_layers - 1
    assert forward_backward() == layers_but_last
    enable_activation_checkpointing(lm)
    assert forward_backward() == 2 * layers_but_last  # each run again in backward
