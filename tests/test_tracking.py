"""Tracking with the real thing: an MLflow server on loopback, read back over REST, and the run
page rendered in headless Chromium."""
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, ROOT, fresh_run_dir, run_cli, tiny_overrides
from sabiscale.train.engine import free_port
from sabiscale.config import load_config
from sabiscale.train.hooks import TrainHook
from sabiscale.track.tracking import MAX_PARAM_LENGTH, MLflowTracker, NullTracker, flatten, make_tracker

# CLI subprocesses, 2-rank launches, MLflow servers: `make test`, not `make check`
pytestmark = pytest.mark.integration

ARTIFACTS = ROOT / "test-artifacts"


def test_flatten_nests_with_dots_and_lists_as_json():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_only_rank_zero_tracks(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert isinstance(make_tracker(cfg, rank=1), NullTracker)
    assert not (tmp_path / "mlflow.db").exists()


def test_long_values_go_to_an_artifact_and_names_carry_a_timestamp(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.system_metrics=false"])
    cfg.data.languages = [f"lang{i:05d}" for i in range(1000)]  # flattens to > MAX_PARAM_LENGTH characters
    tracker = MLflowTracker(cfg)
    tracker.finish()
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(tracker.run_id)
    assert "data.languages" not in run.data.params and run.data.params["model.hidden_size"] == "128"
    downloaded = client.download_artifacts(tracker.run_id, "long_params.json", str(tmp_path))
    long = json.loads(open(downloaded, encoding="utf-8").read())
    assert len(long["data.languages"]) > MAX_PARAM_LENGTH
    assert run.info.run_name.startswith("run-") and len(run.info.run_name) == len("run-20260101-000000")


def _get(url: str, params: dict | None = None) -> dict:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _start_server(store: Path, port: int) -> subprocess.Popen:
    """launch/mlflow-server.sh in its own process group, returned once /health answers."""
    env = {**os.environ, "MLFLOW_BIN": str(BIN / "mlflow")}
    log = open(store.parent / f"server-{port}.log", "a")
    proc = subprocess.Popen([ROOT / "launch/mlflow-server.sh", str(store), str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None, (store.parent / f"server-{port}.log").read_text()
            time.sleep(0.5)
    _stop_server(proc)
    pytest.fail(f"MLflow server did not come up:\n{(store.parent / f'server-{port}.log').read_text()}")


def _stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = _start_server(tmp_path / "server", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_server(proc)


def test_training_against_a_real_server_read_back_over_rest_and_in_the_browser(demo_cfg, mlflow_server, tmp_path):
    run_name = f"browser-check-{uuid.uuid4().hex[:8]}"
    overrides = tiny_overrides(fresh_run_dir(demo_cfg, tmp_path / "run")) + [
        f"tracking.uri={mlflow_server}", f"tracking.run_name={run_name}", "tracking.experiment=tracking-test",
        "train.max_steps=8", "train.log_every=4", "optim.warmup_steps=1"]
    run_cli([BIN / "sabiscale", "train", str(ROOT / "launch/recipes/demo.yaml"), *overrides])

    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = _get(f"{api}/experiments/get-by-name", {"experiment_name": "tracking-test"})["experiment"]
    runs = _post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["run_name"] == run_name and run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.max_steps"] == "8" and params["loss.kind"] == "masked"
    history = _get(f"{api}/metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": "train/loss"})
    assert [m["step"] for m in history["metrics"]] == list(range(1, 9))
    latest = {m["key"] for m in run["data"]["metrics"]}
    for key in ("train/answer_loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/mem",
                "train/supervised_tokens_per_s", "eval/answer_loss", "train/loss/task/translation",
                "train/loss/lang/yor", "eval/loss/task/ner"):
        assert key in latest, key
    listed = {}
    for folder in ("", "config", "data", "plots", "tokenizer"):
        files = _get(f"{api}/artifacts/list", {"run_id": run["info"]["run_id"], "path": folder}).get("files", [])
        listed.update({f["path"]: f for f in files})
    for path in ("config/deepspeed.json", "config/demo.yaml", "config/resolved_config.json", "data/manifest.json",
                 "plots/loss.png", "plots/loss_per_task.png", "tokenizer/tokenizer.json"):
        assert path in listed, (path, sorted(listed))
    assert run["data"]["tags"] and any(t["key"] == "checkpoint" for t in run["data"]["tags"])

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (CI installs Debian's chromium; `apt-get install chromium`)")
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development"  # the training view, not GenAI's
    from sabiscale.track.tracking import run_page

    page = run_page(mlflow_server, experiment["experiment_id"], run["info"]["run_id"])  # what `train` prints
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert run_name in dom, "the run's name is not on its page"
    assert "train/loss" in dom, "the run's page does not show its metrics"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_run_page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_a_run_can_be_continued_by_id(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.system_metrics=false"])
    first = MLflowTracker(cfg)
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.finish()
    cfg.tracking.run_id = first.run_id
    second = MLflowTracker(cfg)
    second.log_metrics({"train/loss": 1.0}, step=2)
    second.finish()
    client = MlflowClient(tracking_uri=first.uri)
    assert second.run_id == first.run_id
    assert len(client.search_runs([first.experiment_id])) == 1
    history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss"))
    assert history == [(1, 2.0), (2, 1.0)]


def test_an_unreachable_store_never_stops_training(tmp_path, monkeypatch, caplog):
    """A real server goes away mid-run and comes back: nothing raises, one warning, every metric
    arrives; what cannot arrive by the end stays in the run's journal for `tracking sync`."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = free_port()
    store = tmp_path / "server"
    base = f"http://127.0.0.1:{port}"
    server = _start_server(store, port)
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"tracking.uri={base}", "tracking.system_metrics=false",
                             "tracking.experiment=outage", "tracking.retry_seconds=0"])
    tracker = MLflowTracker(cfg)
    tracker.log_metrics({"train/loss": 3.0}, step=1)
    _stop_server(server)
    with caplog.at_level("WARNING", logger="sabiscale.tracking"):
        tracker.log_metrics({"train/loss": 2.0}, step=2)  # store down: kept
        tracker.flush()  # what the sender thread does in the background, here in the test's own time
        tracker.log_metrics({"train/loss": 1.5}, step=3)
        tracker.flush()
    assert sum("unreachable" in r.message for r in caplog.records) == 1
    server = _start_server(store, port)
    try:
        tracker.log_metrics({"train/loss": 1.0}, step=4)  # back: everything kept is sent
        tracker.flush()
        history = _get(f"{base}/api/2.0/mlflow/metrics/get-history", {"run_id": tracker.run_id, "metric_key": "train/loss"})
        assert sorted((m["step"], m["value"]) for m in history["metrics"]) == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
    finally:
        _stop_server(server)
    tracker.log_metrics({"train/loss": 0.5}, step=5)
    tracker.finish()  # store down at the end: the last metric and the end of the run wait in the journal
    from sabiscale.track.journal import read_journal

    journal = read_journal(cfg.output_dir / "tracking_journal.jsonl")
    assert [r["op"] for r in journal.pending] == ["metrics", "status"]
    assert journal.pending[0]["metrics"] == {"train/loss": 0.5}


class StartServerAt(TrainHook):
    """Brings the tracking server up after a given step (it was down before)."""

    def __init__(self, step: int, store: Path, port: int) -> None:
        self.step, self.store, self.port, self.proc = step, store, port, None

    def after_step(self, record) -> None:
        if record.step == self.step:
            self.proc = _start_server(self.store, self.port)


def _read_run(base: str, experiment: str) -> tuple[dict, dict[str, list[int]], set[str]]:
    """(the only run of the experiment, metric key -> steps logged, artifact paths), over REST."""
    api = f"{base}/api/2.0/mlflow"
    found = _get(f"{api}/experiments/get-by-name", {"experiment_name": experiment})["experiment"]
    runs = _post(f"{api}/runs/search", {"experiment_ids": [found["experiment_id"]]})["runs"]
    assert len(runs) == 1, runs
    run = runs[0]
    steps = {}
    for key in ("train/loss", "eval/answer_loss", "model/parameters"):
        history = _get(f"{api}/metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": key})
        steps[key] = sorted(m["step"] for m in history.get("metrics", []))
    listed = set()
    for folder in ("", "config", "data", "tokenizer", "plots"):
        files = _get(f"{api}/artifacts/list", {"run_id": run["info"]["run_id"], "path": folder}).get("files", [])
        listed |= {f["path"] for f in files}
    return run, steps, listed


def _expect_whole_run(run: dict, steps: dict, listed: set, max_steps: int, checkpoint_run_id: str | None) -> None:
    assert run["info"]["status"] == "FINISHED"
    assert steps["train/loss"] == list(range(1, max_steps + 1))  # every step, each once
    assert steps["eval/answer_loss"] == [0, max_steps] and steps["model/parameters"] == [0]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.max_steps"] == str(max_steps)
    for path in ("config/deepspeed.json", "config/resolved_config.json", "data/manifest.json",
                 "tokenizer/tokenizer.json", "plots/loss.png"):
        assert path in listed, (path, sorted(listed))
    assert checkpoint_run_id == run["info"]["run_id"]  # the last checkpoint learned the run


def _late_run_cfg(demo_cfg, out: Path, base: str, max_steps: int):
    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, out)
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches, cfg.train.checkpoint_every = max_steps, 1, 1, 0
    cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.system_metrics = base, "late", False
    cfg.tracking.retry_seconds = 0
    return cfg


def test_a_store_that_comes_up_mid_run_gets_the_whole_run(demo_cfg, world, tmp_path, monkeypatch):
    """The server is down when training starts and comes up after step 3: the run is created then,
    with its parameters, config, manifest and tokenizer, and every metric at its own step."""
    from sabiscale.train.checkpoint import read_sidecar
    from sabiscale.train.loop import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = _late_run_cfg(demo_cfg, tmp_path / "run", base, 6)
    hook = StartServerAt(3, tmp_path / "server", port)
    try:
        result = train(cfg, world, hooks=[hook])
        assert hook.proc is not None and result.run_id is not None
        run, steps, listed = _read_run(base, "late")
        meta, _ = read_sidecar(result.checkpoint)
        _expect_whole_run(run, steps, listed, 6, meta["mlflow_run_id"])
    finally:
        if hook.proc is not None:
            _stop_server(hook.proc)


def test_a_store_never_up_during_the_run_is_synced_later_once(demo_cfg, world, tmp_path, monkeypatch):
    """Nothing answers during the whole run; `sabiscale tracking sync RUN_DIR` later creates the run
    with everything it logged; a second sync sends nothing and duplicates nothing."""
    from sabiscale.train.loop import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = _late_run_cfg(demo_cfg, tmp_path / "run", base, 4)
    result = train(cfg, world)
    assert result.run_id is None
    server = _start_server(tmp_path / "server", port)
    try:
        first = run_cli([BIN / "sabiscale", "tracking", "sync", str(cfg.output_dir)]).stdout
        assert "sent" in first and base in first
        second = run_cli([BIN / "sabiscale", "tracking", "sync", str(cfg.output_dir)]).stdout
        assert "nothing to send" in second
        run, steps, listed = _read_run(base, "late")
        _expect_whole_run(run, steps, listed, 4, run["info"]["run_id"])
    finally:
        _stop_server(server)


def test_an_in_process_run_leaves_the_environment_as_it_was(demo_cfg, world, tmp_path):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; after an in-process run, later
    commands started from this process must still log into their own run directory."""
    import os

    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "run")
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 2, 1, 1
    cfg.tracking.system_metrics = False
    before = os.environ.get("MLFLOW_TRACKING_URI")
    train(cfg, world)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    assert (cfg.output_dir / "mlflow.db").is_file()


def test_a_journal_cut_by_a_kill_goes_on_and_never_creates_a_second_run(tmp_path):
    """kill -9 can cut the journal's last line, or fall between the store creating the run and the
    journal recording its id: the next process drops the torn line, and finds the run by its tag."""
    from sabiscale.track.journal import JOURNAL_NAME, Journal, read_journal, send_pending

    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.system_metrics=false"])
    first = MLflowTracker(cfg)
    first.log_metrics({"train/loss": 2.0}, step=1)
    path = tmp_path / JOURNAL_NAME
    lines = path.read_text().splitlines(keepends=True)
    # the run's id never reached the journal (cut with what followed), and a half-written line ends it
    kept = [line for line in lines if '"op": "run"' not in line and '"op": "sent"' not in line]
    path.write_text("".join(kept) + '{"op": "metrics", "st')
    journal = Journal(path)
    assert journal.state.run_id is None and journal.pending() == len(kept)
    client = MlflowClient(tracking_uri=first.uri)
    send_pending(journal, client, first.uri)
    journal.close()
    assert read_journal(path).run_id == first.run_id  # found by its tag, not created again
    runs = client.search_runs([first.experiment_id])
    assert len(runs) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")] == [(1, 2.0)]


def test_a_restart_before_the_first_checkpoint_continues_the_same_run(tmp_path):
    """Killed before any checkpoint, the same command starts again from step 0: the same run,
    the replayed steps not logged twice. Another configuration in that directory is another run."""
    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.system_metrics=false"])
    first = MLflowTracker(cfg)
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.journal.close()  # killed: no finish
    again = MLflowTracker(cfg)
    again.log_metrics({"train/loss": 2.0}, step=1)
    again.log_metrics({"train/loss": 1.5}, step=2)
    again.finish()
    client = MlflowClient(tracking_uri=first.uri)
    assert again.run_id == first.run_id and len(client.search_runs([first.experiment_id])) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")] == [(1, 2.0), (2, 1.5)]
    changed = cfg.model_copy(deep=True)
    changed.optim.lr = 1e-4
    other = MLflowTracker(changed)
    other.finish()
    assert other.run_id != first.run_id and len(list(tmp_path.glob("tracking_journal.*.jsonl"))) == 1


def _never_created(tmp_path, monkeypatch) -> Path:
    """A run whose store never answered: everything it logged waits in its journal."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"tracking.uri=http://127.0.0.1:{free_port()}",
                             "tracking.system_metrics=false", "tracking.retry_seconds=3600"])
    tracker = MLflowTracker(cfg)
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.finish()
    assert tracker.run_id is None
    return cfg.output_dir


def test_an_interrupted_sync_to_another_store_is_finished_by_the_same_command(tmp_path, monkeypatch):
    """`tracking sync --uri B` of a run never created is cut after it created the run in B: the
    same command again finishes it (the journal names the store the run was created in), so does
    the command without --uri, and a third store is refused naming B."""
    import sabiscale.track.journal as journal_module
    from sabiscale.errors import UserError
    from sabiscale.track.tracking import sync

    run_dir = _never_created(tmp_path, monkeypatch)
    store = f"sqlite:///{tmp_path / 'b.db'}"
    real = journal_module.send_metrics
    monkeypatch.setattr(journal_module, "send_metrics", lambda *a: (_ for _ in ()).throw(ConnectionError("cut")))
    with pytest.raises(ConnectionError):
        sync(run_dir, store)
    monkeypatch.setattr(journal_module, "send_metrics", real)
    again = sync(run_dir, store)
    assert again.sent > 0 and again.uri == store
    client = MlflowClient(tracking_uri=store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.run_id == again.run_id and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(again.run_id, "train/loss")] == [1, 2, 3]
    assert sync(run_dir).sent == 0 and sync(run_dir).uri == store
    with pytest.raises(UserError, match=f"lives in {store}; sync it there"):
        sync(run_dir, f"sqlite:///{tmp_path / 'c.db'}")


@pytest.mark.parametrize("choice", ["continue", "new_run"])
def test_a_resume_given_another_store_says_where_it_logs(tmp_path, caplog, choice):
    """The run lives in store A; a resume names store B: it logs on to A and says so (never "B is
    unreachable"), or with tracking.on_store_change=new_run starts a new run in B."""
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"tracking.uri={a}", "tracking.system_metrics=false"])
    first = MLflowTracker(cfg)
    first.log_metrics({"train/loss": 2.0}, step=1)
    first.journal.close()  # killed after a checkpoint
    resumed_cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"tracking.uri={b}", f"tracking.run_id={first.run_id}",
                                     "tracking.system_metrics=false", f"tracking.on_store_change={choice}"])
    with caplog.at_level("WARNING", logger="sabiscale.tracking"):
        again = MLflowTracker(resumed_cfg, resuming=True)
        again.log_metrics({"train/loss": 1.0}, step=2)
        again.finish()
    said = " ".join(r.message for r in caplog.records)
    assert "unreachable" not in said
    in_a = MlflowClient(tracking_uri=a)
    in_b = MlflowClient(tracking_uri=b)
    runs_b = [r for e in in_b.search_experiments() for r in in_b.search_runs([e.experiment_id])]
    if choice == "continue":
        assert f"lives in {a}" in said and "tracking.on_store_change=new_run" in said
        assert again.uri == a and again.run_id == first.run_id and runs_b == []
        assert [m.step for m in in_a.get_metric_history(first.run_id, "train/loss")] == [1, 2]
    else:
        assert "logs to a new run in" in said
        assert again.uri == b and again.run_id != first.run_id and len(runs_b) == 1
        assert [m.step for m in in_b.get_metric_history(again.run_id, "train/loss")] == [2]
        assert len(list((tmp_path / "run").glob("tracking_journal.*.jsonl"))) == 1  # the first run's journal kept


def test_export_register_creates_a_model_version_read_back_over_rest(demo_cfg, mlflow_server, tmp_path):
    """export --register: the export goes into the run that trained it, and a model version with
    the checkpoint's step and its eval scores appears in the server's Model Registry."""
    out = fresh_run_dir(demo_cfg, tmp_path / "run")
    overrides = tiny_overrides(out) + [f"tracking.uri={mlflow_server}", "tracking.experiment=registry-test",
                                       "train.max_steps=4", "optim.warmup_steps=1", "tracking.system_metrics=false"]
    run_cli([BIN / "sabiscale", "train", str(ROOT / "launch/recipes/demo.yaml"), *overrides])
    checkpoint = out / "checkpoints"
    run_cli([BIN / "sabiscale", "eval", str(checkpoint), "--split", "val", "--generate", "2", "--max-per-file", "10"])
    proc = run_cli([BIN / "sabiscale", "export", str(checkpoint), str(tmp_path / "hf"), "--register", "sabiscale-demo"])
    assert "registered sabiscale-demo version 1" in proc.stdout

    api = f"{mlflow_server}/api/2.0/mlflow"
    assert _get(f"{api}/registered-models/get", {"name": "sabiscale-demo"})["registered_model"]["name"] == "sabiscale-demo"
    versions = _get(f"{api}/model-versions/search", {"filter": "name='sabiscale-demo'"})["model_versions"]
    assert len(versions) == 1
    version = versions[0]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert tags["checkpoint_step"] == "4" and tags["checkpoint"].endswith("step_00000004")
    assert "eval.val.translation/yor.perplexity" in tags and "eval.val.translation/eng-yor.chrf" in tags, sorted(tags)
    experiment = _get(f"{api}/experiments/get-by-name", {"experiment_name": "registry-test"})["experiment"]
    [run] = _post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert version["run_id"] == run["info"]["run_id"]
    files = _get(f"{api}/artifacts/list", {"run_id": version["run_id"], "path": "model/step_00000004"})["files"]
    assert {"model/step_00000004/README.md", "model/step_00000004/model.safetensors"} <= {f["path"] for f in files}


def test_a_slow_store_never_stalls_a_step(tmp_path):
    """Every call to the store takes a second (a real sqlite store behind a client that sleeps
    first): logging ten steps still returns at once, since records go to the journal and a thread
    sends them; at the end every metric is in the store, in order."""
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "tracking.system_metrics=false",
                             "tracking.experiment=slow"])
    tracker = MLflowTracker(cfg)
    real_log_batch = tracker._client.log_batch

    def slow_log_batch(*args, **kwargs):
        time.sleep(1.0)
        return real_log_batch(*args, **kwargs)

    tracker._client.log_batch = slow_log_batch
    started = time.monotonic()
    for step in range(1, 11):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    logging_seconds = time.monotonic() - started
    tracker.finish()
    assert logging_seconds < 0.5, f"ten log calls took {logging_seconds:.2f} s against a store that sleeps 1 s per call"
    history = MlflowClient(tracking_uri=tracker.uri).get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / s) for s in range(1, 11)]
