import json
from pathlib import Path

import pytest

from conftest import fresh_run_dir
from faults import Fault
from sabiscale.train.hooks import StepRecorder, TrainHook
from sabiscale.config import load_config
from sabiscale.errors import UserError
from sabiscale.train.device import cpu_bf16_unit
from sabiscale.train.engine import EngineConfigError, fill_device_defaults, fill_ds_config, resolve_precision

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_profile_fills_from_the_run_config(path):
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum_steps=2", "optim.lr=0.5"])
    filled = fill_device_defaults(fill_ds_config(json.loads(path.read_text()), cfg, world_size=4, precision="fp32",
                                                 origin=str(path)), "cpu")
    assert filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 24
    assert filled["optimizer"]["params"]["lr"] == 0.5
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(filled)


def test_conflicting_values_are_all_reported():
    cfg = load_config(None, ["train.micro_batch_size=3"])
    raw = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}
    with pytest.raises(EngineConfigError) as err:
        fill_ds_config(raw, cfg, world_size=1, precision="fp32", origin="mine.json")
    text = str(err.value)
    assert "mine.json" in text and "train_micro_batch_size_per_gpu is 8" in text and "optimizer.params.lr is 1.0" in text


def test_matching_concrete_values_are_accepted():
    cfg = load_config(None, ["train.micro_batch_size=8"])
    filled = fill_ds_config({"train_micro_batch_size_per_gpu": 8}, cfg, 1, "fp32", "x.json")
    assert filled["train_micro_batch_size_per_gpu"] == 8


def test_precision_follows_the_device():
    # no GPU here: auto is fp32 for a narrow model, and bf16 for a wide one only on a CPU with
    # native bf16 (this machine's own cpuinfo, as torch reads it)
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (cpu_bf16_unit() is not None) is native
    assert cpu_bf16_unit() == ("amx" if torch.cpu._is_amx_tile_supported() else "avx512_bf16" if native else None)
    assert resolve_precision("auto", 64) == "fp32"
    assert resolve_precision("auto", 256) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", 128) == ("bf16" if cpu_bf16_unit() == "avx512_bf16" else "fp32")
    assert resolve_precision("bf16", 64) == "bf16"
    assert resolve_precision("fp32", 1024) == "fp32"


def test_bf16_on_the_cpu_trains_close_to_fp32_resumes_exactly_and_exports_fp32(demo_cfg, world, tmp_path):
    """What a wide model gets by default on a CPU with native bf16, run for real on this CPU
    (emulated where it has none): DeepSpeed's bf16 engine with fp32 master weights in CPU Adam."""
    import torch
    from sabiscale.train.engine import consolidated_state_dict
    from sabiscale.train.loop import train

    fp32 = _train_in_process(demo_cfg, world, tmp_path / "fp32", {"engine.precision": "fp32"})
    whole = _train_in_process(demo_cfg, world, tmp_path / "bf16", {"engine.precision": "bf16", "train.max_steps": 6})
    assert all(x == x for x in whole.train_losses) and whole.train_losses[-1] < whole.train_losses[0]
    assert whole.train_losses[:4] == pytest.approx(fp32.train_losses, rel=0.02)  # bf16 rounding, same curve

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "bf16_resumed")
    cfg.tracking.enabled, cfg.engine.precision = False, "bf16"
    cfg.train.max_steps, cfg.train.eval_batches, cfg.optim.warmup_steps = 6, 1, 1
    cfg.train.checkpoint_every = 4

    class Interrupted(Exception):
        pass

    class InterruptAfterStep4(TrainHook):  # in this process, as a kill between steps would
        def after_step(self, record):
            if record.step == 4:
                raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, world, [InterruptAfterStep4()])
    cfg.engine.precision = "fp32"
    with pytest.raises(UserError, match=r"step 4 was trained in bf16, and engine.precision=fp32 cannot resume it"):
        train(cfg, world)
    # auto on a narrow model chooses fp32 here: a run moved to such a machine keeps its precision
    cfg.engine.precision = "auto"
    resumed = train(cfg, world)
    assert resumed.train_losses == whole.train_losses[4:]  # steps 5-6 after the resume, bit for bit

    module = torch.load(next(whole.checkpoint.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    assert {t.dtype for t in module["module"].values()} == {torch.bfloat16}  # the engine's weights
    exported = consolidated_state_dict(whole.checkpoint.parent, whole.checkpoint.name)
    assert {t.dtype for t in exported.values()} == {torch.float32}  # export: the fp32 master weights


def test_mfu_denominator_is_measured_again_at_each_evaluation(demo_cfg, world, tmp_path):
    """A peak measured while another process held the cores reads low and puts every step's MFU over
    100%; the evaluation at step 2 measures again and the steps after it read sensibly."""
    from sabiscale.train.loop import train_loop
    from sabiscale.train.run import build_run

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "run")
    cfg.tracking.enabled = False
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.eval_batches, cfg.optim.warmup_steps = 4, 2, 1, 1
    from sabiscale.track.tracking import NullTracker

    class Logged(NullTracker):  # what the run logs, per step
        def __init__(self):
            self.steps: dict[int, dict] = {}

        def log_metrics(self, metrics, step):
            self.steps.setdefault(step, {}).update(metrics)

    run = build_run(cfg, world)
    run.peak_flops = 1.0  # what a start beside a busy neighbour would have measured, exaggerated
    run.tracker = logged = Logged()
    train_loop(run)
    mfu = {step: m["train/mfu"] for step, m in logged.steps.items() if "train/mfu" in m}
    assert mfu[1] > 1 and mfu[2] > 1  # before the evaluation: the low peak
    assert 0 < mfu[3] < 1 and 0 < mfu[4] < 1
    assert run.peak_flops > 1e9

    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "configured")
    cfg.train.peak_flops_per_s = 1e6  # the user's figure is kept, however low
    run = build_run(cfg, world)
    train_loop(run)
    assert run.peak_flops == 1e6


def _train_in_process(demo_cfg, world, out, overrides: dict, hooks=()):
    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, out)
    cfg.tracking.enabled = False
    cfg.train.max_steps, cfg.train.eval_batches, cfg.optim.warmup_steps = 4, 1, 1
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    return train(cfg, world, hooks)


def test_zero_stages_train_identically(demo_cfg, world, tmp_path):
    """The head-only loss inside every ZeRO profile (ZeRO-3 gathers the head's weight itself):
    the same data and seed give the same loss curve, whatever the stage or offload; and the same
    FLOP count for MFU (ZeRO-3 empties partitioned parameters, which must not zero the count)."""
    curves, flops = {}, {}
    for profile in ("zero1", "zero2", "zero2_offload", "zero3_offload"):
        steps = StepRecorder()
        result = _train_in_process(demo_cfg, world, tmp_path / profile,
                                   {"engine.ds_config": ROOT / "ds_configs" / f"{profile}.json"}, [steps])
        curves[profile], flops[profile] = result.train_losses, [r.local_flops for r in steps.records]
    reference = curves.pop("zero2_offload")
    assert reference[-1] < reference[0]
    for profile, losses in curves.items():
        assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5), profile
        assert flops[profile] == flops["zero2_offload"], profile


def test_a_non_finite_step_is_skipped_and_training_goes_on(demo_cfg, world, tmp_path):
    clean = _train_in_process(demo_cfg, world, tmp_path / "clean", {})
    spoiled = _train_in_process(demo_cfg, world, tmp_path / "nan", {}, [Fault("nan_loss:2")])
    assert clean.train_losses[0] == spoiled.train_losses[0]
    assert spoiled.train_losses[1] != spoiled.train_losses[1]  # NaN at step 2
    # step 2 changed nothing: step 3 starts from the parameters after step 1, so it differs from the
    # clean run's step 3 but stays finite, and training ends normally
    assert all(x == x for x in spoiled.train_losses[2:]) and spoiled.train_losses[2] != clean.train_losses[2]
    assert spoiled.checkpoint.is_dir()


def test_non_finite_steps_in_a_row_stop_training_with_the_batches_named(demo_cfg, world, tmp_path):
    with pytest.raises(FloatingPointError, match=r"1 optimizer steps in a row .* step 2, global micro-batches \[1\]"):
        _train_in_process(demo_cfg, world, tmp_path / "nan", {"train.max_nonfinite_steps": 1}, [Fault("nan_loss:2")])


@pytest.mark.parametrize("profile,kind", [("zero1", "adamw8bit"), ("zero1", "paged_adamw8bit"),
                                          ("zero2", "adamw8bit"), ("zero2", "paged_adamw8bit"),
                                          ("zero2_offload", "adamw8bit"), ("zero3_offload", "adamw8bit")])
def test_eight_bit_adamw_trains_under_zero_also_with_states_offloaded(demo_cfg, world, tmp_path, profile, kind):
    """bitsandbytes' 8-bit AdamW as DeepSpeed's client optimizer, including ZeRO optimizer offload
    with the 8-bit states held in host memory; it must learn and stay near fp32 AdamW."""
    import torch

    result = _train_in_process(demo_cfg, world, tmp_path / "8bit", {
        "engine.ds_config": ROOT / "ds_configs" / f"{profile}.json", "optim.kind": kind})
    reference = _train_in_process(demo_cfg, world, tmp_path / "fp32", {
        "engine.ds_config": ROOT / "ds_configs" / f"{profile}.json"})
    assert result.train_losses[-1] < result.train_losses[0]
    assert result.train_losses[0] == pytest.approx(reference.train_losses[0], rel=1e-6)  # same data, same init
    assert result.train_losses == pytest.approx(reference.train_losses, rel=0.05)  # 8-bit moments, close
    # the optimizer states in the checkpoint are bitsandbytes' uint8 moments
    states = [torch.load(p, map_location="cpu", weights_only=False)
              for p in sorted(result.checkpoint.glob("*optim_states.pt"))]
    assert torch.uint8 in _tensor_dtypes(states)


def _tensor_dtypes(tree) -> set:
    import torch

    if isinstance(tree, torch.Tensor):
        return {tree.dtype}
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return set().union(*(_tensor_dtypes(c) for c in children)) if children else set()


def test_paged_eight_bit_with_optimizer_offload_is_refused_with_the_reason(demo_cfg):
    from sabiscale.train.engine import load_ds_config

    cfg = demo_cfg.model_copy(deep=True)
    cfg.engine.ds_config = ROOT / "ds_configs" / "zero2_offload.json"
    cfg.optim.kind = "paged_adamw8bit"
    with pytest.raises(EngineConfigError, match="nothing to page; use optim.kind=adamw8bit"):
        load_ds_config(cfg, 1, "fp32")
    cfg.optim.kind = "adamw8bit"
    adjusted = load_ds_config(cfg, 1, "fp32")
    assert "optimizer" not in adjusted and adjusted["zero_force_ds_cpu_optimizer"] is False


def test_activation_checkpointing_recomputes_to_the_same_losses(demo_cfg, world, tmp_path):
    plain = _train_in_process(demo_cfg, world, tmp_path / "plain", {})
    recomputed = _train_in_process(demo_cfg, world, tmp_path / "ckpt", {"train.activation_checkpointing": True})
    assert recomputed.train_losses == pytest.approx(plain.train_losses, rel=1e-5, abs=1e-6)


@pytest.mark.integration
def test_zero1_bf16_keeps_one_optimizer_wrapper_whatever_the_accumulation(demo_cfg, world, tmp_path):
    """An elastic resume keeps the global batch and changes accumulation with the ranks; under
    ZeRO-1 + bf16 DeepSpeed picks its optimizer wrapper by the accumulation dtype, so that dtype
    is pinned for the profile: BF16_Optimizer at 1 and at 2 accumulation steps, writing checkpoints
    of the same layout (the same files, the same optimizer-state keys)."""
    import torch

    from sabiscale.train.loop import train_loop
    from sabiscale.train.run import build_run

    wrappers, layouts = [], []
    for accumulation in (1, 2):
        cfg = demo_cfg.model_copy(deep=True)
        cfg.output_dir, cfg.tracking.enabled = fresh_run_dir(demo_cfg, tmp_path / f"accum{accumulation}"), False
        cfg.engine.ds_config, cfg.engine.precision = ROOT / "ds_configs" / "zero1.json", "bf16"
        cfg.train.max_steps, cfg.train.eval_batches, cfg.optim.warmup_steps = 2, 1, 1
        cfg.train.grad_accum_steps = accumulation
        run = build_run(cfg, world)
        wrappers.append(type(run.engine.optimizer).__name__)
        with run.stop:
            checkpoint = train_loop(run).checkpoint
        (states,) = checkpoint.glob("*optim_states.pt")
        saved = torch.load(states, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        layouts.append((sorted(p.name for p in checkpoint.glob("*.pt")), sorted(saved)))
    assert wrappers == ["BF16_Optimizer", "BF16_Optimizer"]
    assert layouts[0] == layouts[1]


class HostSyncs:
    """Counts the operators that make the host wait for the device: a scalar read (.item(),
    float(), int()), nonzero (its output size is data-dependent). On a GPU each is a stall."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if name.startswith(HostSyncs.SYNCING):
                    counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("profile", ["zero2", "zero3_offload"])
def test_host_syncs_per_step_do_not_grow_with_the_layers(demo_cfg, world, tmp_path, profile):
    """One training step, counted by a dispatch mode: the same small number of host syncs for 2
    and 4 decoder layers (none per layer), within a fixed bound."""
    from sabiscale.train.run import build_run
    from sabiscale.train.step import train_step

    totals = {}
    for layers in (2, 4):
        cfg = demo_cfg.model_copy(deep=True)
        cfg.output_dir, cfg.tracking.enabled = fresh_run_dir(demo_cfg, tmp_path / f"{profile}_{layers}"), False
        cfg.engine.ds_config, cfg.model.num_layers = ROOT / "ds_configs" / f"{profile}.json", layers
        cfg.train.max_steps, cfg.train.eval_batches, cfg.optim.warmup_steps = 5, 1, 1
        run = build_run(cfg, world)
        for step in (1, 2):  # past the first steps' one-time work
            train_step(run, [next(run.loader) for _ in range(cfg.train.grad_accum_steps)], step)
        syncs = HostSyncs()
        with syncs.mode:
            train_step(run, [next(run.loader) for _ in range(cfg.train.grad_accum_steps)], 3)
        totals[layers] = syncs.counts
    assert totals[2] == totals[4], totals
    assert sum(totals[2].values()) <= 16, totals[2]
