"""The memory planner: its model-state terms equal DeepSpeed's own estimators where they overlap,
and its recommendation follows from the numbers (measured against real RSS in benchmarks/)."""

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from conftest import BIN, ROOT, run_cli
from sabiscale.config import load_config
from sabiscale.train.plan import GiB, ModelShape, load_profile, parse_size, plan_all, plan_profile

DS = ROOT / "ds_configs"
STATES = ("parameters", "gradients", "optimizer")  # model states, as DeepSpeed's estimators count them


def _states(part: dict) -> float:
    return sum(v for k, v in part.items() if k.startswith(STATES) and "gathered" not in k)


@pytest.fixture(scope="module")
def recipe():
    return load_config(ROOT / "launch/recipes/shared_data.yaml", ["model.hidden_size=1024", "model.num_layers=16",
                                                                  "model.num_heads=16", "model.intermediate_size=2752"])


@pytest.mark.parametrize("gpus", [1, 4])
def test_model_states_equal_deepspeeds_estimators(recipe, gpus):
    shape = ModelShape.from_config(recipe, 16384)
    assert 230e6 < shape.params < 240e6 and shape.largest_layer == 16384 * 1024
    P = shape.params

    zero2 = plan_profile(recipe, shape, "zero2", load_profile("zero2", DS), "adamw", False, gpus, gpus)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, gpus, 1, cpu_offload=False, additional_buffer_factor=1.0)
    assert _states(zero2.device) == pytest.approx(ds_gpu, rel=1e-6)

    offload = plan_profile(recipe, shape, "zero2_offload", load_profile("zero2_offload", DS), "adamw", False, gpus, gpus)
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(P, gpus, 1, cpu_offload=True, additional_buffer_factor=1.0)
    assert _states(offload.device) == pytest.approx(ds_gpu, rel=1e-6)  # the 16-bit parameters
    if gpus == 1:  # DeepSpeed floors the host figure at 4 bytes x GPUs per parameter for many GPUs
        assert _states(offload.host) == pytest.approx(ds_cpu, rel=1e-6)

    zero3 = plan_profile(recipe, shape, "zero3_offload", load_profile("zero3_offload", DS), "adamw", False, gpus, gpus)
    ds_cpu, ds_gpu, largest = estimate_zero3_model_states_mem_needs(P, shape.largest_layer, gpus, 1, cpu_offload=True,
                                                                    cpu_offload_params=True, zero_init=True,
                                                                    additional_buffer_factor=1.0)
    assert _states(zero3.host) == pytest.approx(ds_cpu, rel=1e-6)
    assert _states(zero3.device) == 0  # everything offloaded: only the gathered working set stays
    assert zero3.device["parameters (gathered working set)"] >= largest / 2  # 16-bit copy of the largest layer


def test_eight_bit_moments_and_checkpointing_shrink_what_they_should(recipe):
    shape = ModelShape.from_config(recipe, 16384)
    profile = load_profile("zero2", DS)
    full = plan_profile(recipe, shape, "zero2", profile, "adamw", False, 1, 1)
    small = plan_profile(recipe, shape, "zero2", profile, "adamw8bit", True, 1, 1)
    assert full.device["optimizer: moments (fp32)"] == 8 * shape.params
    assert small.device["optimizer: moments (8-bit)"] == pytest.approx(2 * shape.params, rel=0.02)
    assert small.device["activations (layer inputs, checkpointed)"] < full.device["activations"] / 8


def test_the_recommendation_is_the_cheapest_profile_that_fits(recipe):
    plans, best = plan_all(recipe, 16384, parse_size("24GiB"), None, 1, 1, DS)
    assert best.profile == "zero1" and best.optimizer == "adamw" and not best.activation_checkpointing
    assert best.device_total <= 24 * GiB
    plans, best = plan_all(recipe, 16384, parse_size("4GiB"), None, 1, 1, DS)
    assert best is not None and best.device_total <= 4 * GiB
    assert all(p.device_total > 4 * GiB for p in plans[:plans.index(best)])  # nothing cheaper fits
    _, none = plan_all(recipe, 16384, parse_size("1GiB"), None, 1, 1, DS)
    assert none is None
    assert parse_size("24GB") == 24e9 and parse_size("16000MiB") == 16000 * 2**20


def test_plan_command_prints_the_breakdown_and_the_largest_models():
    proc = run_cli([BIN / "sabiscale", "plan", str(ROOT / "launch/recipes/shared_data.yaml"), "--gpu-memory", "24GiB",
                    "--largest"])
    out = proc.stdout
    assert "recommended: engine.ds_config=ds_configs/zero1.json optim.kind=adamw" in out
    assert "optimizer: moments (fp32)" in out and "loss head: one chunk of logits" in out
    largest = [line for line in out.splitlines() if "M parameters (hidden" in line]
    assert len(largest) == 8  # every profile x optimizer


@pytest.mark.integration
def test_plan_ranks_measures_each_ranks_share_on_the_real_engine_build():
    """`plan --ranks 8` builds the engine for ZeRO-1/2/3 as one rank of 8: the fp32 master weights
    and moments are an eighth of the model's and equal the planner's; ZeRO-3 partitions the
    parameters and ZeRO-1/2 do not; ZeRO-2's gradients are the planner's eighth, while ZeRO-1's
    whole-model gradient term (held inside backward) exceeds what is left at rest."""
    proc = run_cli([BIN / "sabiscale", "plan", str(ROOT / "launch/recipes/naija_small.yaml"), "--ranks", "8"])
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] == "8":
            rows[(cells[0], cells[2])] = (float(cells[3]), float(cells[4]))
    assert len(rows) == 12, proc.stdout
    whole = rows[("zero2", "parameters")][0]
    for profile in ("zero1", "zero2", "zero3_offload"):
        for term, share in (("fp32 master weights", 1 / 8), ("optimizer moments", 2 / 8)):
            measured, planned = rows[(profile, term)]
            assert measured == pytest.approx(whole * share, rel=0.01) and measured == pytest.approx(planned, rel=0.01)
    assert rows[("zero3_offload", "parameters")][0] == pytest.approx(whole / 8, rel=0.01)
    assert rows[("zero1", "parameters")][0] == whole
    assert rows[("zero2", "gradients")][0] == pytest.approx(rows[("zero2", "gradients")][1], rel=0.01)
    assert rows[("zero1", "gradients")][1] == pytest.approx(whole)
    assert rows[("zero1", "gradients")][0] == pytest.approx(whole / 8, rel=0.01)


@pytest.mark.parametrize("gpu, hidden, layers, expected", [
    ("24GiB", 256, 4, "zero1"),      # the recipes' model on a 24 GB GPU
    ("80GiB", 256, 4, "zero1"),
    ("24GiB", 2048, 24, "zero2_offload"),  # ~1.3B parameters: ZeRO-1 and 2 do not fit 24 GB; the optimizer goes to the host
    ("80GiB", 2048, 24, "zero1"),
])
def test_auto_profile_is_the_plans_recommendation(gpu, hidden, layers, expected):
    """engine.ds_config=auto on a GPU takes what `sabiscale plan` recommends for the same model,
    optimizer and checkpointing; the CPU keeps zero2_offload."""
    from sabiscale.train.plan import choose_profile

    cfg = load_config(ROOT / "launch/recipes/shared_data.yaml", [f"model.hidden_size={hidden}", f"model.num_layers={layers}",
                                                                 f"model.num_heads={hidden // 64}",
                                                                 f"model.intermediate_size={hidden * 8 // 3 // 64 * 64}"])
    chosen, why = choose_profile(cfg, 16384, "cuda", parse_size(gpu), 1, 1, DS)
    plans, best = plan_all(cfg, 16384, parse_size(gpu), None, 1, 1, DS)
    assert chosen.stem == expected and "fits" in why
    same_settings = [p for p in plans if p.optimizer == "adamw" and not p.activation_checkpointing]
    assert chosen.stem == next(p.profile for p in same_settings if p.device_total <= parse_size(gpu))
    assert choose_profile(cfg, 16384, "cpu", 0, 1, 1, DS)[0].stem == "zero2_offload"


def test_zero3_working_set_follows_deepspeeds_release_rules(recipe):
    """ZeRO-3 keeps a parameter gathered when its next use (its backward) is within
    stage3_max_reuse_distance: at DeepSpeed's default (1e9) a 235M model stays whole on the device;
    with reuse 0 one layer plus a prefetch bucket, and no prefetch at max_live 0."""
    shape = ModelShape.from_config(recipe, 16384)
    profile = load_profile("zero3_offload", DS)

    def gathered(**zero) -> float:
        ds = {**profile, "zero_optimization": {**profile["zero_optimization"], **zero}}
        return plan_profile(recipe, shape, "zero3_offload", ds, "adamw", False, 1, 1).device["parameters (gathered working set)"]

    assert gathered() == 2 * shape.params
    assert gathered(stage3_max_reuse_distance=0) == 2 * (shape.largest_layer + 5e7)
    assert gathered(stage3_max_reuse_distance=0, stage3_max_live_parameters=0) == 2 * shape.largest_layer
    assert gathered(stage3_max_reuse_distance=2e8) == 2 * min(shape.params, 1e8 + shape.largest_layer + 5e7)


def test_the_fused_layers_weight_copies_are_what_backward_keeps(demo_cfg, parts):
    """The planner's fused-projection term equals the concatenated weights autograd saves in a real
    forward of the fused layers; no attention mask is counted (none is built)."""
    import torch

    from sabiscale.model import layer as layer_ops
    from sabiscale.model.build import build_model, hidden_at

    tok, batch, _ = parts
    lm = build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)
    params = {p.data_ptr() for p in lm.parameters()}
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        hidden_at(lm, batch.input_ids, batch.position_ids, batch.loss_mask, layer_ops.EAGER)
    m = demo_cfg.model
    weight_shapes = {(m.hidden_size + 2 * m.hidden_size, m.hidden_size), (2 * m.intermediate_size, m.hidden_size)}
    copies = {t.data_ptr(): t for t in saved  # linear saves the weight or its transposed view
              if {tuple(t.shape), tuple(t.shape[::-1])} & weight_shapes and t.data_ptr() not in params}
    shape = ModelShape.from_config(demo_cfg, len(tok))
    plan = plan_profile(demo_cfg, shape, "zero2", load_profile("zero2", DS), "adamw", False, 1, 1, on_gpu=False)
    assert plan.host["fused projections: concatenated weights kept for backward"] == sum(
        4 * t.numel() for t in copies.values())
    assert not any("mask" in term for term in plan.host)
    zero3 = plan_profile(demo_cfg, shape, "zero3_offload", load_profile("zero3_offload", DS), "adamw", False, 1, 1)
    assert not any("fused" in term for term in zero3.device)  # ZeRO-3 runs the unfused modules
