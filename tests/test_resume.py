"""Nothing lost: kill -9 at several points (real processes, real DeepSpeed checkpoints), resume,
and get exactly the uninterrupted run's losses and samples."""
import json
import signal
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, ROOT, child_env, fresh_run_dir, tiny_overrides

# CLI subprocesses, 2-rank launches, MLflow servers: `make test`, not `make check`
pytestmark = pytest.mark.integration

STEPS = 8


def _train(out, extra, launcher=None, fault=None):
    """`sabiscale train` (through tests/faults.py when a fault is injected), 1 process or a launcher."""
    expect_kill = fault is not None
    args = ["train", str(ROOT / "launch/recipes/demo.yaml"),
            *tiny_overrides(out), f"train.max_steps={STEPS}", "optim.warmup_steps=1", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.trace_samples=true", "tracking.system_metrics=false", *extra]
    program = [str(ROOT / "tests" / "faults.py"), f"--fault={fault}"] if fault else ["--module", "sabiscale"]
    if launcher:
        args = [str(BIN / "deepspeed"), "--num_gpus", str(launcher), "--master_port", "29741", *program, *args]
    else:
        args = [str(BIN / "python"), *(program if fault else ["-m", "sabiscale"]), *args]
    proc = subprocess.run(args, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    if expect_kill:
        # killed by SIGKILL: -9 from Python's view, 137 or 247 (-9 & 0xff) through a launcher
        assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL, 256 - signal.SIGKILL), proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# what depends on the clock or the process, not on the training: left out of the comparison
TIMED = ("train/tokens_per_s", "train/supervised_tokens_per_s", "train/mfu", "train/mem", "train/first_step_seconds",
         "model/parameters", "system/")


def _losses(out):
    """train/loss per step as the run has it, and the run count. Every step is logged once: a
    resumed run does not log again the steps it replays from its checkpoint."""
    metrics, runs = _metrics(out)
    return metrics["train/loss"], runs


def _metrics(out):
    """Every metric the run logged that does not depend on the clock: name -> {step: value}."""
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    found = {}
    for name in client.get_run(runs[0].info.run_id).data.metrics:
        if name.startswith(TIMED):
            continue
        history = client.get_metric_history(runs[0].info.run_id, name)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"{name}: steps logged twice: {sorted(steps)}"
        found[name] = {m.step: m.value for m in history}
    return found, len(runs)


def _same_metrics(out, reference_metrics, rel=1e-5, abs=1e-6):
    """Every logged metric of a resumed run (per task and language, eval included) equals the
    uninterrupted run's at every step, and the plot history it draws from holds the whole curve."""
    metrics, _ = _metrics(out)
    assert sorted(metrics) == sorted(reference_metrics)
    for name, values in reference_metrics.items():
        assert sorted(metrics[name]) == sorted(values), name
        assert [metrics[name][s] for s in sorted(values)] == pytest.approx([values[s] for s in sorted(values)],
                                                                           rel=rel, abs=abs), name
    history = [json.loads(line) for line in (out / "plots" / "history.jsonl").read_text().splitlines()]
    plotted_steps = {name: sorted(e["step"] for e in history if name in e["metrics"]) for name in ("train/loss",
                                                                                                   "eval/answer_loss")}
    assert plotted_steps == {name: sorted(reference_metrics[name]) for name in plotted_steps}


def _samples(out):
    """step -> sample keys trained on (last attempt of each step), over all ranks."""
    seen: dict[int, dict[int, list[str]]] = {}
    for trace in sorted((out / "trace").glob("rank*.jsonl")):
        for line in trace.read_text().splitlines():
            record = json.loads(line)
            seen.setdefault(record["step"], {}).update({index: keys for index, keys in record["batches"]})
    return {step: [k for index in sorted(b) for k in b[index]] for step, b in seen.items()}


@pytest.fixture(scope="module")
def reference(demo_cfg, tmp_path_factory):
    out = fresh_run_dir(demo_cfg, tmp_path_factory.mktemp("uninterrupted"))
    _train(out, ["train.grad_accum_steps=2"])
    metrics, runs = _metrics(out)
    assert runs == 1 and sorted(metrics["train/loss"]) == list(range(1, STEPS + 1))
    assert "train/loss/task/ner" in metrics and "eval/loss/lang/yor" in metrics
    # every task x language pair of the validation split, with bits per byte, at step 0 and each eval
    pairs = {k for k in metrics if k.startswith("eval_") and k.endswith("/bits_per_byte")}
    assert len(pairs) >= 3 and len({k.split("/")[0] for k in pairs}) >= 2  # one eval micro-batch holds a few
    assert all(sorted(metrics[k]) == [0, STEPS] for k in pairs)
    return metrics["train/loss"], _samples(out), metrics


@pytest.mark.parametrize("fault", ["mid_step:5", "between_steps:5", "mid_checkpoint:6"])
def test_kill_and_resume_equals_uninterrupted(demo_cfg, reference, tmp_path, fault):
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    _train(out, ["train.grad_accum_steps=2"], fault=fault)
    checkpoints = out / "checkpoints"
    if fault.startswith("mid_checkpoint"):
        # killed inside the save of step 6: its partitions exist only as a .partial directory,
        # `latest` still names step 4, and step 4 is what the resumed run loads
        assert (checkpoints / "step_00000006.partial").is_dir() and not (checkpoints / "step_00000006").exists()
        assert (checkpoints / "latest").read_text() == "step_00000004"
    proc = _train(out, ["train.grad_accum_steps=2"])
    assert "resuming from" in proc.stdout
    assert not list(checkpoints.glob("*.partial"))
    losses, runs = _losses(out)
    ref_losses, ref_samples, ref_metrics = reference
    assert runs == 1  # the resumed run continued the same MLflow run
    _same_metrics(out, ref_metrics)
    samples = _samples(out)
    assert samples == ref_samples  # every step saw the same samples: no repeats, no gaps
    assert sorted(k for keys in samples.values() for k in keys) == sorted(k for keys in ref_samples.values() for k in keys)


def test_two_ranks_killed_and_resumed(demo_cfg, reference, tmp_path):
    """2 gloo ranks x 1 micro-batch, rank processes killed between steps by the launcher's
    teardown after rank 0 dies; resumed on 2 ranks it matches 1 rank x 2 accumulation steps."""
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    _train(out, [], launcher=2, fault="between_steps:3")
    _train(out, [], launcher=2)
    losses, runs = _losses(out)
    ref_losses, ref_samples, ref_metrics = reference
    assert runs == 1
    _same_metrics(out, ref_metrics)
    assert _samples(out) == ref_samples


@pytest.mark.parametrize("profile", ["zero2_offload", "zero3_offload"])
def test_elastic_resume_on_another_number_of_ranks_continues_the_curve(demo_cfg, reference, tmp_path, profile):
    """2 ranks -> 1 and 1 -> 2 ranks (ZeRO-3: 2 -> 1), through DeepSpeed's universal checkpoint (converted once,
    beside the checkpoint): the losses after the resume are the uninterrupted run's, and no sample
    is repeated or skipped. The global batch stays 8 sequences (accumulation follows the ranks)."""
    common = ["train.global_batch_size=8", f"engine.ds_config={ROOT / 'ds_configs' / profile}.json"]
    if profile == "zero2_offload":  # the module's reference: 1 rank x 2 accumulation steps, the default profile
        ref_losses, ref_samples, ref_metrics = reference
    else:
        ref = fresh_run_dir(demo_cfg, tmp_path / "ref")
        _train(ref, common)
        ref_metrics = _metrics(ref)[0]
        ref_losses, ref_samples = ref_metrics["train/loss"], _samples(ref)
    # both directions on the default profile; ZeRO-3 (whose universal conversion is its own code) one way
    for first, then in ((2, 1), (1, 2)) if profile == "zero2_offload" else ((2, 1),):
        out = fresh_run_dir(demo_cfg, tmp_path / f"{first}to{then}")
        _train(out, common, launcher=first if first > 1 else None, fault="between_steps:4")
        proc = _train(out, common, launcher=then if then > 1 else None)
        assert "universal checkpoint" in proc.stdout and "step_00000004_universal" in proc.stdout
        assert not list((out / "checkpoints").glob("*_universal*"))  # pruned with the checkpoint it came from
        losses, runs = _losses(out)
        assert runs == 1, (first, then)
        assert [losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
            [ref_losses[s] for s in range(1, STEPS + 1)], rel=1e-4, abs=1e-5), (first, then)
        _same_metrics(out, ref_metrics, rel=1e-4, abs=1e-5)  # the eval loss too: one global eval set on any ranks
        assert _samples(out) == ref_samples, (first, then)


def test_elastic_resume_of_an_8bit_optimizer_is_refused_with_the_reason(demo_cfg, tmp_path):
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    _train(out, ["optim.kind=adamw8bit"], launcher=2, fault="between_steps:3")
    proc = subprocess.run([str(BIN / "sabiscale"), "train", str(ROOT / "launch/recipes/demo.yaml"),
                           *tiny_overrides(out), f"train.max_steps={STEPS}", "optim.warmup_steps=1",
                           "train.checkpoint_every=2", "optim.kind=adamw8bit"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "written by 2 ranks" in proc.stderr and "universal format" in proc.stderr and "adamw8bit" in proc.stderr


def test_prune_keeps_the_newest_and_every_nth(tmp_path):
    from sabiscale.train.checkpoint import SIDECAR, complete_checkpoints, prune, step_tag

    for step in range(1, 9):
        tag = tmp_path / step_tag(step)
        tag.mkdir()
        (tag / SIDECAR).write_text(json.dumps({"step": step}))
    (tmp_path / "step_00000009.partial").mkdir()  # never counted as a checkpoint
    prune(tmp_path, keep_last=2, keep_every=3)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [step_tag(s) for s in (3, 6, 7, 8)]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 6 MiB tmpfs: room for one checkpoint of the tiny model (~4 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to run out of disk ({done.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_out_of_disk_while_saving_keeps_the_previous_checkpoint(demo_cfg, tmp_path, tiny_disk):
    from sabiscale.train.checkpoint import load_trained_lm

    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    (out / "checkpoints").symlink_to(tiny_disk)
    proc = subprocess.run([str(BIN / "sabiscale"), "train", str(ROOT / "launch/recipes/demo.yaml"),
                           *tiny_overrides(out), f"train.max_steps={STEPS}", "optim.warmup_steps=1",
                           "train.eval_batches=1", "train.checkpoint_every=2", "tracking.system_metrics=false"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    saved = sorted(p.name for p in tiny_disk.iterdir() if p.name.startswith("step_"))
    assert saved and not any(name.endswith(".partial") for name in saved)  # the failed save is cleaned up
    newest = saved[-1]
    assert newest != f"step_{STEPS:08d}"  # the disk did fill up before the end
    assert "could not write checkpoint" in proc.stderr and f"{newest} is intact" in proc.stderr
    assert (tiny_disk / "latest").read_text() == newest
    _, _, meta = load_trained_lm(tiny_disk / newest)  # still whole and loadable
    assert f"step_{meta['step']:08d}" == newest


def _resume_attempt(out, extra=()):
    return subprocess.run([str(BIN / "sabiscale"), "train", str(ROOT / "launch/recipes/demo.yaml"),
                           *tiny_overrides(out), "train.max_steps=6", "optim.warmup_steps=1", "train.eval_batches=1",
                           "train.checkpoint_every=2", "train.keep_last=0", "tracking.system_metrics=false", *extra],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


def test_damaged_or_mismatched_checkpoints_are_refused_by_name_and_the_previous_one_resumes(demo_cfg, tmp_path):
    from sabiscale.train.checkpoint import CheckpointError, load_trained_lm

    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    _train(out, ["train.max_steps=4", "train.keep_last=0"])
    checkpoints = out / "checkpoints"
    newest, previous = checkpoints / "step_00000004", checkpoints / "step_00000002"
    before = {p: p.read_bytes() for p in sorted(newest.rglob("*")) if p.is_file()}

    # another model size in the recipe: named field by field, before DeepSpeed sees a tensor
    proc = _resume_attempt(out, ["model.hidden_size=32", "model.intermediate_size=64"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.hidden_size: 64 in the checkpoint, 32 now" in proc.stderr
    assert "model.intermediate_size: 128 in the checkpoint, 64 now" in proc.stderr

    # a bit flipped in the optimizer states (same size): found by the sha256 recorded at save
    optim_file = next(newest.glob("*optim_states.pt"))
    data = bytearray(optim_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_trained_lm(newest)
    optim_file.write_bytes(before[optim_file])

    # the model file cut short, as by a full disk or an interrupted copy
    model_file = next(newest.glob("*model_states.pt"))
    model_file.write_bytes(before[model_file][: len(before[model_file]) // 3])
    proc = _resume_attempt(out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint {newest} is damaged" in proc.stderr
    assert f"{model_file.name}: {len(before[model_file]) // 3} bytes, {len(before[model_file])} when saved" in proc.stderr
    assert f"mv {newest} {newest}.damaged" in proc.stderr and "step_00000002" in proc.stderr
    assert (checkpoints / "latest").read_text() == "step_00000004"  # nothing was changed
    assert model_file.stat().st_size == len(before[model_file]) // 3

    # an older checkpoint without the inventory: DeepSpeed's own failure, wrapped with the way out
    sidecar = newest / "sabiscale.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    proc = _resume_attempt(out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"DeepSpeed could not load checkpoint {newest}" in proc.stderr and f"mv {newest}" in proc.stderr

    # following the advice resumes from the previous checkpoint and finishes; the damaged one is kept
    newest.rename(newest.with_name(newest.name + ".damaged"))
    proc = _resume_attempt(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {previous}" in proc.stdout + proc.stderr
    assert (checkpoints / "step_00000004.damaged").is_dir() and (checkpoints / "step_00000006").is_dir()
    assert load_trained_lm(checkpoints / "step_00000006")[2]["step"] == 6


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(demo_cfg, world, tmp_path):
    """Continual pre-training: a new run with train.init_from starts at step 0 with the weights of
    another run's checkpoint, so its step-0 validation loss is that checkpoint's final one; a
    checkpoint of another model shape is refused with the differing fields."""
    from sabiscale.errors import UserError
    from sabiscale.train.loop import train

    source = demo_cfg.model_copy(deep=True)
    source.output_dir = fresh_run_dir(demo_cfg, tmp_path / "source")
    source.tracking.enabled = False
    source.train.max_steps, source.optim.warmup_steps, source.train.eval_batches = 3, 1, 2
    trained = train(source, world)
    warm = source.model_copy(deep=True)
    warm.output_dir = fresh_run_dir(demo_cfg, tmp_path / "warm")
    warm.train.init_from, warm.train.max_steps = trained.checkpoint.parent, 2
    continued = train(warm, world)
    assert continued.eval_answer_loss[0] == pytest.approx(trained.eval_answer_loss[3], rel=1e-6)
    cold = source.model_copy(deep=True)
    cold.output_dir = fresh_run_dir(demo_cfg, tmp_path / "cold")
    cold.train.max_steps = 2
    assert train(cold, world).eval_answer_loss[0] != pytest.approx(trained.eval_answer_loss[3], rel=1e-3)
    other = warm.model_copy(deep=True)
    other.output_dir = fresh_run_dir(demo_cfg, tmp_path / "other")
    other.model.intermediate_size = 96
    with pytest.raises(UserError, match=r"other dimensions than this recipe's \(model.intermediate_size"):
        train(other, world)


def test_init_from_under_zero3_reads_one_parameter_at_a_time(demo_cfg, world, tmp_path, monkeypatch):
    """A ZeRO-3 run warm-started from a ZeRO-3 checkpoint: the weights arrive (its step-0
    validation loss is the source's last), read lazily one parameter at a time from DeepSpeed's
    memory-mapped partitions, never as a whole fp32 state dict."""
    from deepspeed.utils import zero_to_fp32

    from sabiscale.train.loop import train

    source = demo_cfg.model_copy(deep=True)
    source.output_dir = fresh_run_dir(demo_cfg, tmp_path / "source")
    source.engine.ds_config = ROOT / "ds_configs" / "zero3_offload.json"
    source.tracking.enabled = False
    source.train.max_steps, source.optim.warmup_steps, source.train.eval_batches = 2, 1, 2
    trained = train(source, world)
    made: list[int] = []
    contiguous = zero_to_fp32.GatheredTensor.contiguous
    monkeypatch.setattr(zero_to_fp32.GatheredTensor, "contiguous", lambda self: made.append(self.shape.numel())
                        or contiguous(self))
    monkeypatch.setattr(zero_to_fp32, "to_torch_tensor", lambda *a, **k: pytest.fail("the whole state dict was built"))
    warm = source.model_copy(deep=True)
    warm.output_dir = fresh_run_dir(demo_cfg, tmp_path / "warm")
    warm.train.init_from, warm.train.max_steps = trained.checkpoint.parent, 1
    continued = train(warm, world)
    assert continued.eval_answer_loss[0] == pytest.approx(trained.eval_answer_loss[2], rel=1e-6)
    from sabiscale.model.build import build_model
    shapes = [p.numel() for p in build_model(demo_cfg.model, 600, demo_cfg.data.seq_len, 0, 1, 0).parameters()]
    assert sorted(made) == sorted(shapes)  # each parameter made once, alone
