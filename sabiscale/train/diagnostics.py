"""A view inside the step: a profiler trace of chosen steps, a watchdog for slow or hung steps,
and a memory report when a rank runs out of memory. Each writes under the run's output_dir, one
file per rank, so what a rank saw survives it.

    train.profile_steps=a:b   torch.profiler over steps a..b -> profile/rank<N>.pt.trace.json
                              (open in Perfetto or chrome://tracing); rank 0 logs its own to MLflow
    train.watchdog_factor=k   a step slower than k x the median step so far (and at least
                              train.watchdog_min_seconds) -> watchdog/rank<N>_step<S>.txt with
                              every thread's Python stack, and the run tagged watchdog/slow_step
    out of memory             -> oom/rank<N>.json: the error, the peak memory, the step, and the
                              planner's estimate for this recipe (train/plan.py); on CUDA also
                              oom/rank<N>.pickle, the allocator's history (pytorch.org/memory_viz)

The watchdog is a thread: a rank stuck in a collective (a peer died, NCCL hung) still writes its
stacks within seconds of the bound, instead of everyone waiting silently for the process-group
timeout. It only watches the training step itself (data, forward, backward, update); evaluation
and checkpoints have their own, longer costs.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import resource
import statistics
import threading
import time
from collections import deque
from pathlib import Path

import torch

log = logging.getLogger("sabiscale.train")


class ProfileWindow:
    """torch.profiler around steps [first, last] (inclusive); nothing outside them."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, rank: int, tracker) -> None:
        self.window, self.path, self.rank, self.tracker = window, out_dir / "profile" / f"rank{rank}.pt.trace.json", rank, tracker
        self.profiler = None

    def begin(self, step: int) -> None:
        if self.window is not None and step == self.window[0]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def end(self, step: int) -> None:
        if self.profiler is not None and step == self.window[1]:
            self.profiler.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.path))
            self.profiler = None
            log.info("profile of steps %d-%d: %s (open it in https://ui.perfetto.dev)", *self.window, self.path)
            if self.rank == 0:
                self.tracker.log_artifact(self.path, "profile")


def parse_window(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    first, last = (int(part) for part in text.split(":"))
    return first, last


class StepWatchdog:
    """Times each training step against the median of the steps before it, from a thread."""

    WARMUP_STEPS = 3  # steps timed before the bound applies (the first step, with compilation, is not timed)

    def __init__(self, factor: float, min_seconds: float, out_dir: Path, rank: int, tracker) -> None:
        self.factor, self.min_seconds, self.dir, self.rank, self.tracker = factor, min_seconds, out_dir / "watchdog", rank, tracker
        self.durations: deque[float] = deque(maxlen=200)
        self.lock = threading.Lock()
        self.step: int | None = None
        self.began: float | None = None
        self.fired_for: int | None = None
        self.stopped = threading.Event()
        self.thread = None
        if factor > 0:
            self.thread = threading.Thread(target=self._watch, name="sabiscale-watchdog", daemon=True)
            self.thread.start()

    def begin(self, step: int) -> None:
        with self.lock:
            self.step, self.began = step, time.monotonic()

    def end(self, first_of_run: bool) -> None:
        with self.lock:
            if self.began is not None and not first_of_run:
                self.durations.append(time.monotonic() - self.began)
            self.began = None

    def bound(self) -> float | None:
        """Seconds a step may take, or None until enough steps are timed."""
        if len(self.durations) < self.WARMUP_STEPS:
            return None
        return max(self.factor * statistics.median(self.durations), self.min_seconds)

    def close(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        poll = max(0.05, min(1.0, self.min_seconds / 5))
        while not self.stopped.wait(poll):
            with self.lock:
                step, began, bound = self.step, self.began, self.bound()
            if began is None or bound is None or step == self.fired_for:
                continue
            elapsed = time.monotonic() - began
            if elapsed > bound:
                self.fired_for = step
                self._dump(step, elapsed, bound)

    def _dump(self, step: int, elapsed: float, bound: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}_step{step:08d}.txt"
        median = statistics.median(self.durations)
        with path.open("w", encoding="utf-8") as out:
            out.write(f"rank {self.rank}, step {step}: {elapsed:.1f} s and running; bound {bound:.1f} s "
                      f"({self.factor:g} x the median step {median:.2f} s, at least {self.min_seconds:g} s)\n\n")
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
        log.warning("step %d has taken %.1f s, over %.1f s (%g x the median step): every thread's Python stack "
                    "is in %s", step, elapsed, bound, self.factor, path)
        if self.rank == 0:  # the tracker is locked against the training thread (track/tracking.py)
            self.tracker.set_tags({"watchdog/slow_step": str(step), "watchdog/dumps": str(self.dir)})


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's refusal (a RuntimeError)."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def start_memory_history(device: torch.device) -> None:
    """On CUDA, keep the allocator's recent history, so an out-of-memory error can be explained
    (a bounded ring of entries; its cost is a stack capture per allocation)."""
    if device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")


def write_oom_report(err: BaseException, cfg, world, step: int | None, vocab_size: int) -> Path:
    """oom/rank<N>.json (and, on CUDA, the allocator snapshot beside it); returns the JSON path."""
    out_dir = cfg.output_dir / "oom"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rank{world.rank}.json"
    report = {"rank": world.rank, "world_size": world.world_size, "step": step, "error": str(err).strip()[:2000],
              "device": str(world.device),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if world.device.type == "cuda":
        report["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(world.device)
        report["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(world.device)
        snapshot = out_dir / f"rank{world.rank}.pickle"
        try:
            torch.cuda.memory._dump_snapshot(str(snapshot))
            report["allocator_snapshot"] = str(snapshot)
        except Exception as dump_err:  # noqa: BLE001 - the JSON report matters more
            report["allocator_snapshot"] = f"not written: {dump_err}"
    report["plan"] = planned_memory(cfg, world, vocab_size)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.error("out of memory on rank %d at step %s: peak %.2f GiB; report (with the planner's estimate for this "
              "recipe) in %s. `sabiscale plan` lists the profiles and settings that fit.", world.rank, step,
              report.get("peak_allocated_bytes", report["peak_rss_bytes"]) / 2**30, path)
    return path


def planned_memory(cfg, world, vocab_size: int) -> dict:
    """The planner's bytes for this recipe, world and device, term by term."""
    from sabiscale.train.plan import ModelShape, plan_profile

    try:
        ds_config = json.loads(Path(cfg.engine.ds_config).read_text(encoding="utf-8"))
        plan = plan_profile(cfg, ModelShape.from_config(cfg, vocab_size), Path(cfg.engine.ds_config).stem, ds_config,
                            cfg.optim.kind.removeprefix("paged_"), cfg.train.activation_checkpointing, world.world_size,
                            max(1, torch.cuda.device_count()) if world.device.type == "cuda" else 1,
                            on_gpu=world.device.type == "cuda")
    except Exception as plan_err:  # noqa: BLE001 - a report without the plan is still a report
        return {"error": f"not planned: {plan_err}"}
    return {"device_bytes": plan.device, "host_bytes": plan.host, "device_total": plan.device_total,
            "host_total": plan.host_total}
