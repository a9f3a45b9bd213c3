"""A view inside the step (train/diagnostics.py), on one short real run: a profiler trace of
chosen steps, the watchdog's stack dump and tag for a step that sleeps, and the memory report of
a real allocator refusal."""
import json
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import fresh_run_dir
from sabiscale.config import build_config, config_to_dict
from sabiscale.errors import UserError
from sabiscale.train.hooks import TrainHook

SLOW_STEP, OOM_STEP = 7, 9


class SleepThenAllocate(TrainHook):
    """Step SLOW_STEP sleeps inside its backward (the step itself, which the watchdog watches);
    step OOM_STEP asks the allocator for a petabyte, which it refuses at once."""

    def after_backward(self, step):
        if step == SLOW_STEP:
            time.sleep(4.0)
        if step == OOM_STEP:
            torch.empty(1 << 50, dtype=torch.uint8)


@pytest.fixture(scope="module")
def diagnosed_run(demo_cfg, world, tmp_path_factory):
    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path_factory.mktemp("diagnostics"))
    cfg.tracking.enabled, cfg.tracking.system_metrics = True, False
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches, cfg.train.micro_batch_size = 12, 1, 1, 2
    cfg.train.profile_steps = "2:3"
    # a normal step here takes ~0.1-0.5 s (more beside other work): 1.5 s is above any, 4 s well over
    cfg.train.watchdog_factor, cfg.train.watchdog_min_seconds = 3.0, 1.5
    with pytest.raises(RuntimeError, match="can't allocate memory") as raised:
        train(cfg, world, hooks=[SleepThenAllocate()])
    return cfg, raised.value


def run_of(cfg):
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.output_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def test_profile_steps_write_a_chrome_trace_logged_to_mlflow(diagnosed_run):
    cfg, _ = diagnosed_run
    trace = json.loads((cfg.output_dir / "profile" / "rank0.pt.trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"sabiscale/forward", "sabiscale/backward", "sabiscale/optimizer_step"} <= names
    client, run = run_of(cfg)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "profile")] == ["profile/rank0.pt.trace.json"]


def test_the_watchdog_dumps_the_stacks_of_a_slow_step_and_tags_the_run(diagnosed_run):
    cfg, _ = diagnosed_run
    dump = cfg.output_dir / "watchdog" / f"rank0_step{SLOW_STEP:08d}.txt"
    text = dump.read_text()
    assert f"step {SLOW_STEP}:" in text and "x the median step" in text
    assert "in after_backward" in text and "Thread" in text  # the sleeping hook, found in the main thread's stack
    _, run = run_of(cfg)
    assert run.data.tags["watchdog/slow_step"] == str(SLOW_STEP)


def test_out_of_memory_leaves_a_report_with_the_peak_and_the_plan(diagnosed_run):
    cfg, err = diagnosed_run
    report = json.loads((cfg.output_dir / "oom" / "rank0.json").read_text())
    assert report["step"] == OOM_STEP and "can't allocate memory" in report["error"]
    assert report["peak_rss_bytes"] > 100 * 2**20  # this process holds torch, the model, the optimizer
    assert report["plan"]["host_total"] > 0 and "parameters" in json.dumps(report["plan"]["host_bytes"])
    _, run = run_of(cfg)
    assert run.info.status == "FAILED" and "can't allocate memory" in run.data.tags["error"]


def test_a_profile_window_must_run_forward(demo_cfg):
    raw = config_to_dict(demo_cfg)
    raw["train"]["profile_steps"] = "5:2"
    with pytest.raises(UserError, match="profile_steps"):
        build_config(raw, origin="test")
