"""Soak: training under random `kill -9` and a tracking server that comes and goes, checked
against an uninterrupted run. A command, not a test (about an hour on 2 CPU cores).

1. prepare the demo recipe's data once;
2. calibrate: seconds per step of the demo model on this machine, to pick the number of steps
   that keeps the soaked run busy for --minutes;
3. reference: that many steps uninterrupted, tracked in its own local store;
4. soak: the same command against an MLflow server (launch/mlflow-server.sh); at random moments
   the training process group is killed with SIGKILL and started again (it resumes from its
   newest checkpoint), and the server is stopped and started again, until the run completes;
   then `sabiscale tracking sync` sends what the run journaled while the server was down;
5. checks, over the server's REST-backed client: one MLflow run, FINISHED, every train/loss step
   present exactly once (none lost, none duplicated), and each step's loss equal to the
   reference's.

    .venv/bin/python benchmarks/soak.py                  # --minutes 30: ~65 minutes in all
    .venv/bin/python benchmarks/soak.py --minutes 3      # a quick look

Writes benchmarks/results/soak.{md,json}; the runs stay in runs/soak/.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "soak"
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
RECIPE = ROOT / "launch" / "recipes" / "demo.yaml"
CHECKPOINT_EVERY = 50


def run_args(out: Path, steps: int, extra: list[str]) -> list[str]:
    return [str(BIN / "sabiscale"), "train", str(RECIPE), f"output_dir={out}", f"data.dir={WORK / 'data'}",
            f"train.max_steps={steps}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_last=2",
            "train.log_every=100", f"train.eval_every={max(steps // 4, 1)}", "optim.warmup_steps=20",
            "tracking.system_metrics=false", *extra]


def child_env() -> dict[str, str]:
    # a dead server must cost a training step seconds, not MLflow's default minutes of retries
    return {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


def timed_run(out: Path, steps: int, extra: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(run_args(out, steps, extra), check=True, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL)
    return time.monotonic() - started


class Server:
    """launch/mlflow-server.sh on a free loopback port, stopped and started on demand."""

    def __init__(self, store: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.store, self.proc = store, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.store.parent / "server.log", "a")
        self.proc = subprocess.Popen([str(ROOT / "launch" / "mlflow-server.sh"), str(self.store), str(self.port)],
                                     env={**os.environ, "MLFLOW_BIN": str(BIN / "mlflow")}, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the MLflow server did not come up; see {self.store.parent / 'server.log'}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.proc = None

    @property
    def up(self) -> bool:
        return self.proc is not None


def soak(steps: int, args, server: Server) -> dict:
    """Run to completion under random kills and server outages; what happened, with times."""
    rng = random.Random(args.seed)
    out = WORK / "soaked"
    events, started = [], time.monotonic()
    log = open(WORK / "soaked.log", "a")
    proc = None
    next_kill = time.monotonic() + rng.uniform(args.kill_min, args.kill_max)
    next_toggle = time.monotonic() + rng.uniform(args.server_min, args.server_max)
    while True:
        if proc is None:
            proc = subprocess.Popen(run_args(out, steps, [f"tracking.uri={server.uri}", "tracking.experiment=soak",
                                                          "tracking.retry_seconds=5"]),
                                    cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        code = proc.poll()
        if code == 0:
            break
        if code is not None:
            raise RuntimeError(f"training failed on its own (exit {code}); see {WORK / 'soaked.log'}")
        now = time.monotonic()
        if now >= next_kill:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc = None
            events.append({"at_s": round(now - started), "event": "kill -9", "latest": latest(out)})
            next_kill = now + rng.uniform(args.kill_min, args.kill_max)
        if now >= next_toggle:
            server.stop() if server.up else server.start()
            events.append({"at_s": round(now - started), "event": "server up" if server.up else "server down"})
            next_toggle = time.monotonic() + rng.uniform(args.server_min, args.server_max)
        time.sleep(0.5)
    events.append({"at_s": round(time.monotonic() - started), "event": "training complete"})
    if not server.up:
        server.start()
        events.append({"at_s": round(time.monotonic() - started), "event": "server up"})
    synced = subprocess.run([str(BIN / "sabiscale"), "tracking", "sync", str(out)], cwd=ROOT, env=child_env(),
                            capture_output=True, text=True, check=True).stdout.strip()
    return {"minutes": (time.monotonic() - started) / 60, "events": events, "sync": synced}


def latest(out: Path) -> str | None:
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def losses(uri: str, experiment: str | None = None) -> tuple[list, dict[int, list[float]], str]:
    """(runs, step -> every train/loss value logged at that step, status of the first run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id])]
    by_step: dict[int, list[float]] = {}
    for metric in client.get_metric_history(runs[0].info.run_id, "train/loss"):
        by_step.setdefault(metric.step, []).append(metric.value)
    return runs, by_step, runs[0].info.status


def check(steps: int, server: Server) -> dict:
    ref_runs, reference, _ = losses(f"sqlite:///{WORK / 'reference' / 'mlflow.db'}")
    runs, soaked, status = losses(server.uri, "soak")
    expected = set(range(1, steps + 1))
    diffs = [abs(soaked[s][0] - reference[s][0]) / abs(reference[s][0]) for s in expected if s in soaked]
    return {"runs": len(runs), "status": status, "steps": steps,
            "lost_steps": sorted(expected - set(soaked)), "duplicated_steps": sorted(s for s, v in soaked.items() if len(v) > 1),
            "max_rel_loss_diff": max(diffs) if diffs else None, "reference_runs": len(ref_runs)}


def write_results(args, steps: int, seconds_per_step: float, reference_s: float, soaked: dict, verdict: dict) -> None:
    command = (f".venv/bin/python benchmarks/soak.py --minutes {args.minutes} --kill-min {args.kill_min} "
               f"--kill-max {args.kill_max} --server-min {args.server_min} --server-max {args.server_max} --seed {args.seed}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"), "steps": steps,
                                                   "seconds_per_step": seconds_per_step, "reference_s": reference_s,
                                                   **soaked, **verdict}, indent=2) + "\n")
    kills = sum(e["event"] == "kill -9" for e in soaked["events"])
    outages = sum(e["event"] == "server down" for e in soaked["events"])
    ok = (verdict["runs"] == 1 and verdict["status"] == "FINISHED" and not verdict["lost_steps"]
          and not verdict["duplicated_steps"] and verdict["max_rel_loss_diff"] is not None
          and verdict["max_rel_loss_diff"] <= 1e-5)
    lines = ["# Soak: random kill -9 and a tracking server that comes and goes\n",
             f"Command: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d')}, 2-core CPU, demo recipe "
             f"(checkpoint every {CHECKPOINT_EVERY} steps).\n",
             "| measure | value |", "|---|---:|",
             f"| soaked training, wall clock | {soaked['minutes']:.1f} min |",
             f"| steps (same for the uninterrupted reference, {reference_s / 60:.1f} min) | {steps} |",
             f"| kill -9 of the training process group | {kills} |",
             f"| tracking server stopped (and started again) | {outages} |",
             f"| MLflow runs for the soaked training | {verdict['runs']} |",
             f"| final run status | {verdict['status']} |",
             f"| train/loss steps lost | {len(verdict['lost_steps'])} |",
             f"| train/loss steps logged more than once | {len(verdict['duplicated_steps'])} |",
             f"| largest relative difference from the uninterrupted loss | {verdict['max_rel_loss_diff']:.2e} |",
             "", f"**{'Passed' if ok else 'FAILED'}**: " + ("one run, every step once, the uninterrupted curve." if ok else
                                                        "see the numbers above and runs/soak/."),
             "", f"After training: `sabiscale tracking sync` said: {soaked['sync']}", "", "Events (seconds from start):", ""]
    lines += [f"- {e['at_s']} s: {e['event']}" + (f" (newest checkpoint {e['latest']})" if e.get("latest") else "")
              for e in soaked["events"]]
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30, help="how long the soaked run should train")
    parser.add_argument("--kill-min", type=float, default=60, help="seconds between kills, at least")
    parser.add_argument("--kill-max", type=float, default=240)
    parser.add_argument("--server-min", type=float, default=30, help="seconds between server stops/starts, at least")
    parser.add_argument("--server-max", type=float, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    subprocess.run([str(BIN / "sabiscale"), "prepare", str(RECIPE), f"output_dir={WORK / 'data'}",
                    f"data.dir={WORK / 'data'}"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    short = timed_run(WORK / "calibrate-short", 20, ["tracking.enabled=false"])
    long = timed_run(WORK / "calibrate-long", 220, ["tracking.enabled=false"])
    seconds_per_step = (long - short) / 200
    # restarts (DeepSpeed start-up, replayed steps) take the rest of the wall clock
    steps = max(CHECKPOINT_EVERY * 2, int(args.minutes * 60 * 0.75 / seconds_per_step) // 10 * 10)
    print(f"{seconds_per_step * 1000:.0f} ms per step: {steps} steps", flush=True)
    reference_s = timed_run(WORK / "reference", steps, [])
    server = Server(WORK / "server" / "store")
    server.store.parent.mkdir(parents=True)
    server.start()
    try:
        soaked = soak(steps, args, server)
        verdict = check(steps, server)
    finally:
        if server.up:
            server.stop()
    write_results(args, steps, seconds_per_step, reference_s, soaked, verdict)


if __name__ == "__main__":
    main()
