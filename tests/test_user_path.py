"""What a user meets first and what protects their work: short runs, fast failures, overrides
anywhere, typed fields, one writer per directory, a run's final state in MLflow."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, ROOT, child_env, fresh_run_dir, tiny_overrides
from sabiscale.config import load_config, resolve_warmup

# CLI subprocesses, 2-rank launches, MLflow servers: `make test`, not `make check`
pytestmark = pytest.mark.integration


def test_a_short_run_gets_a_warmup_that_fits_with_a_note():
    cfg = load_config(ROOT / "launch/recipes/shared_data.yaml", ["train.max_steps=30"])
    resolved, note = resolve_warmup(cfg)
    assert cfg.optim.warmup_steps >= 30 and resolved.optim.warmup_steps == 3
    assert "warming up for 3 steps instead" in note
    unchanged, none = resolve_warmup(load_config(None, ["train.max_steps=500", "optim.warmup_steps=20"]))
    assert unchanged.optim.warmup_steps == 20 and none is None


def _cli(*args, env=None, timeout=600):
    return subprocess.run([str(BIN / "sabiscale"), *args], cwd=ROOT, env=child_env(env), capture_output=True,
                          text=True, timeout=timeout)


def test_missing_shards_are_named_before_deepspeed_starts(tmp_path):
    started = time.monotonic()
    proc = _cli("train", str(ROOT / "launch/recipes/demo.yaml"), f"output_dir={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "manifest.json does not exist" in proc.stderr and "sabiscale prepare" in proc.stderr
    assert "deepspeed" not in proc.stdout.lower()  # refused before the engine was imported
    assert time.monotonic() - started < 30


def test_overrides_may_follow_flags(demo_cfg, tmp_path):
    out = tmp_path / "p"
    proc = _cli("prepare", str(ROOT / "launch/recipes/demo.yaml"), "--skip-bad", *tiny_overrides(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "shards" / "manifest.json").is_file()


def test_a_list_where_text_is_expected_is_named(tmp_path):
    from sabiscale.tasks import BUILTIN_TASKS, BadRecord, render

    record = {"text": ["a", "b"], "lang": "yor"}
    with pytest.raises(BadRecord, match=r"f\.jsonl:3: field 'text' is a list \(2 items\); this task expects a string"):
        render("text", BUILTIN_TASKS["text"], record, "f.jsonl:3", [], 0)
    ner = {"tokens": ["Ade", "lo"], "tags": ["B-PER", "O"], "lang": "yor"}
    assert render("ner", BUILTIN_TASKS["ner"], ner, "n.jsonl:1", [], 0).answer.strip() == "B-PER O"


def test_an_exported_model_is_readable_by_others(demo_cfg, world, tmp_path):
    from sabiscale.publish.export import export_hf
    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "run")
    cfg.tracking.enabled = False
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 2, 1, 1
    out = export_hf(train(cfg, world).checkpoint, tmp_path / "hf")
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and all(m & 0o044 == 0o044 for m in modes.values()), modes


def test_a_second_run_on_one_directory_is_refused_naming_the_holder(demo_cfg, tmp_path):
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    args = ["train", str(ROOT / "launch/recipes/demo.yaml"), *tiny_overrides(out), "train.max_steps=400",
            "optim.warmup_steps=1", "tracking.enabled=false"]
    first = subprocess.Popen([str(BIN / "sabiscale"), *args], cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = out / ".sabiscale.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (lock.is_file() and lock.read_text().strip()):
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = _cli(*args[:-1], "train.max_steps=2")
        assert second.returncode == 2
        assert f"is in use by `sabiscale train` (pid {first.pid} on" in second.stderr and "nothing was written" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it
        first.wait()
    third = _cli(*args[:-2], "train.max_steps=2")
    assert third.returncode == 0, third.stderr[-2000:]  # no stale lock left behind


def test_a_run_that_raises_is_marked_failed_with_its_error(demo_cfg, world, tmp_path):
    from faults import Fault

    from sabiscale.errors import TrainingDiverged
    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "run")
    cfg.tracking.system_metrics = False
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches, cfg.train.max_nonfinite_steps = 4, 1, 1, 1
    with pytest.raises(TrainingDiverged):
        train(cfg, world, [Fault("nan_loss:2")])
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.output_dir / 'mlflow.db'}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FAILED"
    assert "TrainingDiverged" in run.data.tags["error"] and "non-finite" in run.data.tags["error"]


def test_a_local_run_keeps_its_artifacts_in_its_directory_and_prints_its_page(demo_cfg, tmp_path):
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = subprocess.run([str(BIN / "sabiscale"), "train", str(ROOT / "launch/recipes/demo.yaml"), *tiny_overrides(out),
                           "train.max_steps=2", "optim.warmup_steps=1", "tracking.system_metrics=false",
                           f"engine.ds_config={ROOT / 'ds_configs/zero2_offload.json'}"],
                          cwd=elsewhere, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (elsewhere / "mlruns").exists() and list((out / "mlruns").rglob("loss.png"))
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in proc.stdout
    # eval of its checkpoint: a report beside the checkpoint (JSON + markdown), scores in the same run
    checkpoint = out / "checkpoints" / "step_00000002"
    proc = subprocess.run([str(BIN / "sabiscale"), "eval", str(checkpoint), "--split", "val", "--generate", "1",
                           "--max-per-file", "20"], cwd=elsewhere, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (checkpoint / "eval_val.json").is_file() and (checkpoint / "eval_val.md").is_file()
    assert f"logged to MLflow run {run.info.run_id}" in proc.stdout
    logged = client.get_run(run.info.run_id).data.metrics
    assert any(k.startswith("val/translation/") and k.endswith("/bits_per_byte") for k in logged), sorted(logged)[:10]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval_val.json", "eval/eval_val.md"} <= artifacts
    # the prompt guide's example runs through `sabiscale generate`
    proc = subprocess.run([str(BIN / "sabiscale"), "generate", str(out / "checkpoints"),
                           "<translate> Good morning, my friend. <yor>", "--max-new-tokens", "5"], cwd=elsewhere,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


def test_the_readme_prompt_guide_is_the_registry_s():
    import re

    from sabiscale.tasks import task_guide

    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"<!-- tasks:begin -->\n(.*?)\n<!-- tasks:end -->", readme, re.S).group(1)
    assert shown == task_guide(), "README's prompt table drifted: paste the output of `sabiscale tasks` there"


def test_two_runs_of_one_recipe_share_its_prepared_data(shared_data, tmp_path):
    recipe = str(ROOT / "launch/recipes/shared_data.yaml")
    small = [f"data.jsonl_root={shared_data}", f"data.dir={tmp_path / 'data'}", "data.max_records_per_file=30",
             "data.seq_len=256", "data.sequences_per_shard=64", "data.val_fraction=0.1", "tokenizer.vocab_size=800",
             "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=128",
             "train.eval_batches=1", "train.eval_every=0", "tracking.enabled=false"]
    assert _cli("prepare", recipe, *small).returncode == 0
    again = _cli("prepare", recipe, *small)
    assert again.returncode == 0 and "already holds data prepared with these settings" in again.stdout
    other = _cli("prepare", recipe, *small, "data.seq_len=512")
    assert other.returncode == 2 and "data.seq_len" in other.stderr and "nothing was changed" in other.stderr
    for name in ("first", "second"):  # no flag points at the data: the recipe's data.dir does
        proc = _cli("train", recipe, *small, f"output_dir={tmp_path / name}", "train.max_steps=3")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / name / "checkpoints" / "step_00000003").is_dir() and not (tmp_path / name / "shards").exists()
    rerun = _cli("train", recipe, *small, f"output_dir={tmp_path / 'first'}", "train.max_steps=3")
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout and "raise train.max_steps" in rerun.stdout


def test_a_task_whose_every_record_is_skipped_is_named(tmp_path):
    """--skip-bad over a sentiment file whose every record is bad: prepare says that task has no
    examples (count, where the list is) instead of silently dropping it; when no task has any
    example left, the error says the same, and the list is still written."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"Ọjọ́ {i} dára púpọ̀ lónìí", "lang": "yor"}, ensure_ascii=False) + "\n"
                            for i in range(40)), encoding="utf-8")
    sentiment = tmp_path / "sentiment.jsonl"
    sentiment.write_text("".join(json.dumps({"text": f"tweet {i}", "lang": "yor"}) + "\n" for i in range(7)), encoding="utf-8")
    files = [{"path": str(text), "format": "jsonl", "task": "text"},
             {"path": str(sentiment), "format": "jsonl", "task": "sentiment"}]

    def recipe(name, entries):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({"output_dir": str(tmp_path / name), "data": {
            "source": "files", "files": entries, "seq_len": 64, "sequences_per_shard": 16, "val_fraction": 0.1},
            "tokenizer": {"vocab_size": 400}}))
        return path

    done = _cli("prepare", str(recipe("some", files)), "--skip-bad")
    assert done.returncode == 0, done.stderr[-3000:]
    listed = tmp_path / "some" / "shards" / "skipped.jsonl"
    assert "task 'sentiment': all 7 records were bad and skipped; it has no examples" in done.stdout
    assert str(listed) in done.stdout and len(listed.read_text().splitlines()) == 7
    refused = _cli("prepare", str(recipe("none", files[1:])), "--skip-bad")
    assert refused.returncode == 2
    assert "no training examples found" in refused.stderr and "all 7 records were bad and skipped" in refused.stderr
    assert len((tmp_path / "none" / "shards" / "skipped.jsonl").read_text().splitlines()) == 7


def test_eval_on_a_split_the_data_lacks_says_which_split_would_work(demo_cfg, tmp_path):
    """A run whose split holds nothing out (heldout_fraction 0, no `orig_split` in the demo corpus):
    `eval --split dev` names --split val/all."""
    from sabiscale.train.loop import train
    from sabiscale.train.engine import ensure_launcher_env, init_distributed

    ensure_launcher_env()
    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "run")
    cfg.tracking.enabled = False
    cfg.data.heldout_fraction = 0.0
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 1, 1, 1
    checkpoint = train(cfg, init_distributed()).checkpoint
    proc = _cli("eval", str(checkpoint), "--split", "dev", "--generate", "0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no dev records" not in proc.stderr and "no dev examples" in proc.stderr
    assert "--split val (" in proc.stderr and "--split all (" in proc.stderr
