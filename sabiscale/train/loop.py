"""`sabiscale train`: the one training loop.

Per optimizer step, in this order: fetch the step's micro-batches, forward + backward + update
(train/step.py: loss = sum / global count of supervised targets), log, evaluate, probe,
checkpoint. What the loop needs is built once by train/run.py; DeepSpeed stays in engine.py, data
order in data/loader.py, the loss in loss/. Test and benchmark instruments attach through
train/hooks.py, never through the recipe.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm import tqdm

from sabiscale.config import RunConfig, config_to_dict
from sabiscale.data.batch import Vocab
from sabiscale.errors import TrainingDiverged
from sabiscale.track.metrics import (StepSums, TaskLanguageStats, TokenStats, measure_matmul_peak, memory_in_use,
                                     selection_metrics)
from sabiscale.track.plots import loss_plots
from sabiscale.train.checkpoint import rng_state, save_checkpoint, step_tag
from sabiscale.train.diagnostics import is_out_of_memory, write_oom_report
from sabiscale.train.device import describe_device
from sabiscale.train.engine import World, all_reduce_sum, barrier, engine_dtype
from sabiscale.train.hooks import StepRecord, TrainHook
from sabiscale.train.preemption import Preempted
from sabiscale.train.run import Run, build_run
from sabiscale.train.step import train_step

log = logging.getLogger("sabiscale.train")


@dataclass
class TrainResult:
    steps: int
    train_losses: list[float] = field(default_factory=list)
    eval_answer_loss: dict[int, float] = field(default_factory=dict)  # step -> loss
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> every eval metric
    checkpoint: Path | None = None
    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None


def train(cfg: RunConfig, world: World, hooks: list[TrainHook] = ()) -> TrainResult:
    run = build_run(cfg, world, hooks)
    with run.stop:
        try:
            return train_loop(run)
        except Preempted:
            raise  # already saved and marked KILLED
        except BaseException as err:  # the MLflow run tells why it died, then the error goes on
            if is_out_of_memory(err):
                write_oom_report(err, run.cfg, run.world, run.watchdog.step, len(run.token_bytes))
            mark_failed(run.tracker, err)
            raise
        finally:
            run.watchdog.close()


def train_loop(run: Run) -> TrainResult:
    cfg, engine, tracker, world = run.cfg, run.engine, run.tracker, run.world
    result = TrainResult(steps=cfg.train.max_steps, run_id=tracker.run_id, tracking_uri=tracker.uri,
                         experiment_id=tracker.experiment_id)
    if run.start_step == 0:
        run_eval(run, 0, result)
        if run.probe is not None:
            run.probe.record(0, engine.module, world.device)
    nonfinite_in_row = 0
    bar = progress_bar(cfg, world.rank, run.start_step)
    for step in range(run.start_step + 1, cfg.train.max_steps + 1):
        last = step == cfg.train.max_steps
        run.watchdog.begin(step)
        run.profile.begin(step)
        t0 = time.monotonic()
        with record_function("sabiscale/data"):
            micro = [next(run.loader).to(world.device, non_blocking=True) for _ in range(cfg.train.grad_accum_steps)]
        skipped_before = engine.skipped_steps
        out = train_step(run, micro, step)
        skipped = engine.skipped_steps != skipped_before
        nonfinite_in_row = check_finite(skipped, out.sums, run.precision, step, micro, nonfinite_in_row,
                                        cfg.train.max_nonfinite_steps)
        t1 = time.monotonic()
        run.watchdog.end(first_of_run=step == run.start_step + 1)
        if step == run.start_step + 1:
            report_first_step(run, t1 - t0)
        run.tokens_seen += sum(b.num_tokens for b in micro) * world.world_size
        run.flops_seen += float(out.sums.needed_flops)
        metrics = step_metrics(run, out.sums, micro, t1 - t0)
        result.train_losses.append(metrics["train/loss"])
        if step % cfg.train.log_every == 0 or last:
            metrics.update(run.stats.metrics("train", all_reduce_sum, run.kind.selects))  # since the last log line
            run.stats.reset()
            log_line(bar, world.rank, step, cfg.train.max_steps, metrics)
        tracker.log_metrics(metrics, step=step)
        run.history.record(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}",
                        mfu=f"{metrics['train/mfu']:.0%}")
        evaluate_and_save(run, step, last, result)
        run.hooks.after_step(StepRecord(step, t0, t1, micro, out.sums, out.local_targets, out.local_flops))
        run.profile.end(step)
        if out.sums.stop_requests and not last:  # every rank sees the same reduced sums: all stop here
            stop_for_preemption(run, step, result)
    bar.close()
    if run.start_step < cfg.train.max_steps:
        run_eval(run, cfg.train.max_steps, result)
        result.checkpoint = checkpoint(run, cfg.train.max_steps)
        if cfg.train.export_every:
            export(run, cfg.train.max_steps, result)
    else:
        log.info("%s already holds this run trained to step %d (train.max_steps): nothing to do. To train on, "
                 "raise train.max_steps (it continues from there); for another run, give it its own "
                 "output_dir=runs/<name> (it shares the prepared data)", cfg.checkpoint_dir, run.start_step)
        result.checkpoint = cfg.checkpoint_dir / step_tag(run.start_step)
    run.exports.wait()
    tracker.finish()
    result.run_id, result.experiment_id = tracker.run_id, tracker.experiment_id  # created late if the store was down
    return result


def evaluate_and_save(run: Run, step: int, last: bool, result: TrainResult) -> None:
    """What falls due after this step: eval, probe, checkpoint, export (the last step's eval,
    checkpoint and export follow the loop)."""
    train_cfg = run.cfg.train
    if train_cfg.eval_every and step % train_cfg.eval_every == 0 and not last:
        run_eval(run, step, result)
    if run.probe is not None and (step % train_cfg.probe_every == 0 or last):
        run.probe.record(step, run.engine.module, run.world.device)
    if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and not last:
        result.checkpoint = checkpoint(run, step)
    if train_cfg.export_every and step % train_cfg.export_every == 0 and not last:
        export(run, step, result)
    run.exports.poll()


def report_first_step(run: Run, seconds: float) -> None:
    """The first step's time, once: with train.compile it holds the compilation (later steps'
    tokens/s do not)."""
    kernels = run.engine.module.kernels
    if kernels is not None and kernels.compiled:
        log.info("first step: %.1f s, compilation of the decoder layers included", seconds)
    run.tracker.log_metrics({"train/first_step_seconds": seconds}, step=run.start_step + 1)


def mark_failed(tracker, err: BaseException) -> None:
    """FAILED (KILLED for Ctrl-C) with the error's last lines as the run's `error` tag."""
    tail = "".join(traceback.format_exception(err)).strip().splitlines()[-12:]
    tracker.set_tags({"error": "\n".join(tail)[-4000:]})
    tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")


def stop_for_preemption(run: Run, step: int, result: TrainResult) -> None:
    """A rank got SIGTERM/SIGUSR1: save this step (unless it just was), mark the run, stop."""
    if result.checkpoint != run.cfg.checkpoint_dir / step_tag(step):
        result.checkpoint = checkpoint(run, step)
    run.tracker.finish("KILLED")
    # leave together: under `srun --kill-on-bad-exit` the first rank to exit (75) gets the others
    # killed, and one still busy (rank 0 finishing its MLflow run) would then end by a signal,
    # which srun reports instead of 75, and the job would not be requeued
    barrier()
    raise Preempted(step, result.checkpoint, run.stop.signum or signal.SIGTERM)


def step_metrics(run: Run, sums: StepSums, micro: list, seconds: float) -> dict[str, float]:
    """What every step logs (per-task/language losses are added at log lines)."""
    engine, world = run.engine, run.world
    targets = max(sums.targets, 1.0)
    metrics = {"train/loss": sums.loss / targets, "train/answer_loss": sums.answer_loss / max(sums.answer_tokens, 1.0),
               "train/lr": engine.get_lr()[0], "train/supervised_tokens": targets,
               "train/tokens_per_s": sum(b.num_tokens for b in micro) * world.world_size / seconds,
               "train/supervised_tokens_per_s": targets / seconds,
               "train/mfu": sums.needed_flops / seconds / (run.peak_flops * world.world_size),
               "train/mem": memory_in_use(world.device), "train/skipped_steps": engine.skipped_steps,
               "train/flops_seen": run.flops_seen}
    if run.kind.selects:
        metrics.update(selection_metrics(sums))
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


def log_line(bar, rank: int, step: int, max_steps: int, metrics: dict[str, float]) -> None:
    if bar.disable and rank == 0:  # plain lines for SLURM logs and pipes
        log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f mfu %.1f%%", step, max_steps, metrics["train/loss"],
                 metrics["train/lr"], metrics["train/tokens_per_s"], 100 * metrics["train/mfu"])


def progress_bar(cfg: RunConfig, rank: int, start_step: int):
    interactive = rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=cfg.train.max_steps, disable=not interactive, dynamic_ncols=True, desc="train")
    bar.update(start_step)
    return bar


@torch.no_grad()
def evaluate(objective: torch.nn.Module, batches: list, vocab: Vocab, device: torch.device,
             token_bytes: torch.Tensor | None = None) -> dict[str, float]:
    """Answer-token (prompt-masked) loss over the validation micro-batches (records never trained
    on), overall, per task, per language and, with `token_bytes`, per task x language with bits
    per byte; reduced across ranks."""
    objective.eval()
    stats = TokenStats(vocab, device)
    pairs = TaskLanguageStats(vocab, token_bytes, device) if token_bytes is not None else None
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        b = batch.to(device)
        out = objective(b.input_ids, b.position_ids, b.loss_mask, b.task_ids, kind="masked")
        total += torch.stack([out.per_token.sum().double(), out.count.double()])
        stats.add(b, out)
        if pairs is not None:
            pairs.add(b, out)
    objective.train()
    total = all_reduce_sum(total)
    return {"eval/answer_loss": float(total[0] / total[1].clamp(min=1)), **stats.metrics("eval", all_reduce_sum),
            **(pairs.metrics(all_reduce_sum) if pairs is not None else {})}


def run_eval(run: Run, step: int, result: TrainResult) -> None:
    if step > 0:  # build_run has just measured it for step 0
        refresh_peak(run)
    metrics = evaluate(run.engine.module, run.val_batches, run.vocab, run.world.device, run.token_bytes)
    result.eval_answer_loss[step] = metrics["eval/answer_loss"]
    result.eval_metrics[step] = metrics
    run.tracker.log_metrics(metrics, step=step)
    run.history.record(metrics, step)


def refresh_peak(run: Run) -> None:
    """Keep MFU's denominator the fastest matmul this device has shown. One measured while another
    process held the cores reads low and puts MFU over 100% for the whole run (seen: 147%), so it
    is measured again at each evaluation and the highest kept; a configured peak, and a GPU's
    (its spec peak, or one measured after warming its clocks), are left alone."""
    if run.cfg.train.peak_flops_per_s is None and run.world.device.type != "cuda":
        again = measure_matmul_peak(run.world.device, engine_dtype(run.precision), repeats=3)
        run.peak_flops = max(run.peak_flops, again)


def checkpoint(run: Run, step: int) -> Path:
    cfg, world = run.cfg, run.world
    run.exports.wait()  # this save may prune the checkpoint a running export reads
    client_state = {"tokens_seen": run.tokens_seen, "flops_seen": run.flops_seen, "loader": run.loader.state_dict(), "rng": rng_state(),
                    "token_window": run.stats.window(all_reduce_sum),
                    "world_size": world.world_size, "precision": run.precision, "device": describe_device(world.device),
                    "config": config_to_dict(cfg),
                    "tokenizer_sha256": run.manifest["tokenizer_sha256"], "manifest_sha256": run.manifest_sha256,
                    "mlflow_run_id": run.tracker.run_id}
    path = save_checkpoint(run.engine, cfg.checkpoint_dir, step, client_state, cfg.tokenizer_path.parent,
                           world.rank, cfg.train.keep_last, cfg.train.keep_every,
                           before_complete=lambda: run.hooks.during_checkpoint(step))
    if world.rank == 0:
        run.tracker.log_checkpoint(path, upload=cfg.tracking.checkpoints == "artifact")
        for png in loss_plots(run.history.series, cfg.output_dir / "plots"):
            run.tracker.log_artifact(png, "plots")
    return path


def export(run: Run, step: int, result: TrainResult) -> None:
    """train.export_every: a checkpoint of this step (unless one was just saved), exported beside
    it by a child process of rank 0 while training goes on (train/exports.py)."""
    if result.checkpoint != run.cfg.checkpoint_dir / step_tag(step):
        result.checkpoint = checkpoint(run, step)
    run.exports.start(result.checkpoint)


def counts_as_nonfinite(skipped: bool, loss_finite: bool, precision: str) -> bool:
    """Whether a step is one of the `train.max_nonfinite_steps` in a row that stop training. With
    fp16, DeepSpeed's dynamic loss scaling skips a step whenever the scaled gradients overflow and
    lowers the scale: normal, above all at the start (backing off from 2^16 takes several steps in
    a row), so there only a non-finite loss counts (DeepSpeed itself stops at its minimum scale)."""
    return not loss_finite or (skipped and precision != "fp16")


def check_finite(skipped: bool, sums: StepSums, precision: str, step: int, micro: list, in_row: int,
                 limit: int) -> int:
    """DeepSpeed skips an optimizer step whose gradient norm is inf/NaN (parameters untouched, LR
    schedule not advanced). Count such steps in a row and stop at `limit`, naming the batches."""
    if not counts_as_nonfinite(skipped, sums.finite(), precision):
        if skipped:
            log.info("step %d: fp16 gradients overflowed; DeepSpeed lowered the loss scale and skipped the update", step)
        return 0
    in_row += 1
    batches = [b.index for b in micro]
    log.warning("step %d: non-finite loss or gradient (global micro-batches %s); the update was skipped "
                "(%d in a row)", step, batches, in_row)
    if in_row >= limit:
        raise TrainingDiverged(
            f"{in_row} optimizer steps in a row had a non-finite loss or gradient (last: step {step}, global "
            f"micro-batches {batches}); lower optim.lr or check those batches (train.trace_samples=true records "
            "their sample keys), then resume from the last checkpoint")
    return in_row
