"""`sabiscale train`: the one training loop.

Per optimizer step, in this order: fetch the step's micro-batches, count their supervised tokens
across all ranks, forward + backward each micro-batch with loss = sum / global count, optimizer
step, log, evaluate; at the end save a checkpoint. Distributed concerns stay in engine.py; data
order in data/loader.py; the loss in loss/.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sabiscale.train.checkpoint import (CheckpointError, check_intact, kill_self, latest_complete, read_sidecar, remove_partial,
                         restore_rng, rng_state, save_checkpoint, step_tag, way_out)
from sabiscale.config import RunConfig, config_to_dict, resolve_batch
from sabiscale.data.batch import Vocab
from sabiscale.data.loader import check_resumable, expected_counts, make_loader, shard_urls
from sabiscale.train.engine import World, all_reduce_sum, barrier, engine_dtype, initialize, load_ds_config, resolve_precision
from sabiscale.loss.masked import TokenLossObjective
from sabiscale.track.metrics import (MetricHistory, TokenStats, measure_matmul_peak, memory_in_use, selection_metrics,
                      selection_sums)
from sabiscale.model.build import batch_flops, build_model, count_parameters, step_cost
from sabiscale.track.plots import loss_plots
from sabiscale.shards.write import read_manifest
from sabiscale.prep.tokenizer import adopt_tokenizer, load_tokenizer, tokenizer_hash
from sabiscale.track.tracking import make_tracker

log = logging.getLogger("sabiscale.train")


@dataclass
class TrainResult:
    steps: int
    train_losses: list[float] = field(default_factory=list)
    eval_answer_loss: dict[int, float] = field(default_factory=dict)  # step -> loss
    checkpoint: Path | None = None
    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    # per step, for benchmarks: (start, end) on time.monotonic(), and this rank's
    # (tokens, non-padding tokens, supervised targets)
    step_times: list[tuple[float, float]] = field(default_factory=list)
    step_counts: list[tuple[int, int, int]] = field(default_factory=list)
    # per step, this rank: (FLOPs the step needs (sabiscale/model.py::StepCost), FLOPs it executed)
    step_flops: list[tuple[float, float]] = field(default_factory=list)


def check_inputs(cfg: RunConfig) -> dict:
    """The shards must come from the tokenizer we are about to train with (and, for the selective
    loss, carry reference losses unless a reference model scores online)."""
    if not cfg.tokenizer_path.is_file() and cfg.tokenizer.path is not None:
        adopt_tokenizer(Path(cfg.tokenizer.path), cfg.tokenizer_path)
    manifest = read_manifest(cfg.shards_dir)
    ours = tokenizer_hash(cfg.tokenizer_path)
    if manifest["tokenizer_sha256"] != ours:
        raise ValueError(f"{cfg.shards_dir}/manifest.json was written with tokenizer "
                         f"{manifest['tokenizer_sha256'][:12]} but {cfg.tokenizer_path} is {ours[:12]}; "
                         "re-run `sabiscale prepare` so shards and tokenizer match (or set tokenizer.path to theirs)")
    if manifest["seq_len"] != cfg.data.seq_len:
        raise ValueError(f"shards have seq_len {manifest['seq_len']} but data.seq_len is {cfg.data.seq_len}; "
                         "re-run `sabiscale prepare` or set data.seq_len to match")
    if cfg.loss.kind == "selective" and cfg.loss.reference == "shards" and "reference" not in manifest:
        raise ValueError(f"loss.kind=selective reads reference losses from the shards, but {cfg.shards_dir} has none; "
                         f"score them: `sabiscale score --reference REF_CHECKPOINT --shards {cfg.shards_dir} --out NEW_DIR` "
                         "and set data.shards_dir=NEW_DIR (or set loss.reference=online with loss.reference_checkpoint)")
    return manifest


def task_weight_table(cfg: RunConfig, vocab: Vocab) -> list[float] | None:
    if not cfg.loss.task_weights:
        return None
    return [cfg.loss.task_weights.get(task, 1.0) for task in vocab.tasks]


@torch.no_grad()
def evaluate(objective: torch.nn.Module, batches: list, vocab: Vocab, device: torch.device) -> dict[str, float]:
    """Answer-token (prompt-masked) loss over the validation micro-batches, overall and per
    task and language, reduced across ranks."""
    objective.eval()
    stats = TokenStats(vocab, device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        b = batch.to(device)
        out = objective(b.input_ids, b.position_ids, b.loss_mask, b.task_ids, kind="masked")
        total += torch.stack([out.per_token.sum().double(), out.count.double()])
        stats.add(b, out)
    objective.train()
    total = all_reduce_sum(total)
    return {"eval/answer_loss": float(total[0] / total[1].clamp(min=1)), **stats.metrics("eval", all_reduce_sum)}


def _progress(cfg: RunConfig, rank: int):
    interactive = rank == 0 and sys.stderr.isatty()
    return tqdm(total=cfg.train.max_steps, disable=not interactive, dynamic_ncols=True, desc="train")


def train(cfg: RunConfig, world: World) -> TrainResult:
    cfg = resolve_batch(cfg, world.world_size)
    manifest = check_inputs(cfg)
    manifest_sha256 = _file_hash(cfg.shards_dir / "manifest.json")  # recorded in every checkpoint
    vocab = Vocab.from_manifest(manifest)
    tok = load_tokenizer(cfg.tokenizer_path)
    lm = build_model(cfg.model, len(tok), cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    objective = TokenLossObjective(lm, cfg.loss.kind, cfg.loss.chunk_size, tok.pad_token_id,
                                   task_weight_table(cfg, vocab), cfg.loss.ratio)
    precision = resolve_precision(cfg.engine.precision)
    ds_config = load_ds_config(cfg, world.world_size, precision)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(lm)
    engine = initialize(objective, ds_config, cfg.optim)
    resumed = find_resume_point(cfg, world, manifest)
    if resumed is not None:
        load_engine_state(engine, cfg.checkpoint_dir / step_tag(resumed["step"]))
        restore_rng(resumed["rng"])
        if cfg.tracking.run_id is None:  # keep logging into the run that wrote the checkpoint
            cfg = cfg.model_copy(deep=True)
            cfg.tracking.run_id = resumed["mlflow_run_id"]
        log.info("resuming from %s at step %d", cfg.checkpoint_dir / step_tag(resumed["step"]), resumed["step"])

    micro_bs = cfg.train.micro_batch_size
    train_urls = shard_urls(cfg.shards_dir, manifest, "train")
    if resumed is not None:
        check_resumable(resumed["loader"], micro_bs, cfg.seed, cfg.data.shuffle_buffer, train_urls)
    loader = make_loader(train_urls, vocab, micro_bs, world.rank, world.world_size, cfg.seed,
                         cfg.data.shuffle_buffer, cfg.data.num_workers,
                         start=resumed["loader"]["position"] if resumed else 0,
                         expected=expected_counts(cfg.shards_dir, manifest))
    val_loader = make_loader(shard_urls(cfg.shards_dir, manifest, "val"), vocab, micro_bs, world.rank,
                             world.world_size, cfg.seed, 0, 0)
    val_batches = [next(val_loader) for _ in range(cfg.train.eval_batches)]
    reference = online_reference(cfg, manifest, world.device)

    tracker = make_tracker(cfg, world.rank)
    tracker.log_json(ds_config, "config/deepspeed.json")
    tracker.log_json(manifest, "data/manifest.json")
    n_params = count_parameters(lm)
    cost = step_cost(lm)
    tracker.log_metrics({"model/parameters": n_params}, step=0)
    log.info("model: %.2fM parameters, precision %s, world size %d, ZeRO stage %s",
             n_params / 1e6, precision, world.world_size, ds_config["zero_optimization"]["stage"])

    result = TrainResult(steps=cfg.train.max_steps, run_id=tracker.run_id,
                         tracking_uri=getattr(tracker, "uri", None),
                         experiment_id=getattr(tracker, "experiment_id", None))

    history = MetricHistory()
    probe = make_probe(cfg, manifest, vocab, world.rank, tracker)

    def run_eval(step: int) -> None:
        metrics = evaluate(engine.module, val_batches, vocab, world.device)
        result.eval_answer_loss[step] = metrics["eval/answer_loss"]
        tracker.log_metrics(metrics, step=step)
        history.record(metrics, step)

    def checkpoint(step: int) -> Path:
        client_state = {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "rng": rng_state(),
                        "world_size": world.world_size, "config": config_to_dict(cfg),
                        "tokenizer_sha256": manifest["tokenizer_sha256"],
                        "manifest_sha256": manifest_sha256,
                        "mlflow_run_id": tracker.run_id}
        path = save_checkpoint(engine, cfg.checkpoint_dir, step, client_state, cfg.tokenizer_path.parent,
                               world.rank, cfg.train.keep_last, cfg.train.keep_every,
                               kill_mid_write=fault == ("mid_checkpoint", step))
        if world.rank == 0:
            tracker.log_checkpoint(path, upload=cfg.tracking.checkpoints == "artifact")
            for png in loss_plots(history.series, cfg.output_dir / "plots"):
                tracker.log_artifact(png, "plots")
        return path

    fault = parse_fault(cfg.train.fault)
    start_step = resumed["step"] if resumed else 0
    tokens_seen = resumed["tokens_seen"] if resumed else 0
    if resumed is None:
        run_eval(0)
        if probe is not None:
            probe.record(0, engine.module, world.device)
    peak = cfg.train.peak_flops_per_s or measure_matmul_peak(world.device, engine_dtype(precision))
    gas = cfg.train.grad_accum_steps
    selective = cfg.loss.kind == "selective"
    stats = TokenStats(vocab, world.device)
    trace = open_trace(cfg, world.rank)
    nonfinite_in_row = 0
    bar = _progress(cfg, world.rank)
    bar.update(start_step)
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t0 = time.monotonic()
        micro = [next(loader).to(world.device) for _ in range(gas)]
        # The global count of targets is known before any backward: count with the objective's
        # own selection (no model call needed) and reduce once.
        counts = [engine.module.count_targets(b.input_ids, b.position_ids, b.loss_mask, b.task_ids) for b in micro]
        n_local = int(torch.stack(counts).sum())
        n_global = all_reduce_sum(torch.tensor(float(n_local), dtype=torch.float64, device=world.device)).clamp(min=1)
        # DeepSpeed divides by gas and averages over ranks; undo both so the gradient is
        # sum(token losses) / global supervised count, whatever the split.
        scale = gas * world.world_size / n_global
        # loss, answer loss, answer tokens, needed FLOPs (for MFU)
        sums = torch.zeros(4, dtype=torch.float64, device=world.device)
        selection = torch.zeros(5, dtype=torch.float64, device=world.device)
        skipped_before = engine.skipped_steps
        needed = executed = 0.0  # this rank's FLOPs
        for batch in micro:
            if reference is not None:
                batch.ref_loss = reference.score(batch)
            out = engine(batch.input_ids, batch.position_ids, batch.loss_mask, batch.task_ids, batch.ref_loss)
            if fault == ("nan_loss", step):
                out.loss_sum = out.loss_sum * float("nan")
            engine.backward(out.loss_sum * scale)
            if fault == ("mid_step", step):
                kill_self()
            engine.step()
            answer = batch.loss_mask[:, 1:][out.selected]  # which selected targets are answer tokens
            batch_needed, batch_executed = batch_flops(cost, batch.position_ids, batch.task_ids >= 0, int(out.count))
            needed, executed = needed + batch_needed, executed + batch_executed
            sums += torch.stack([out.loss_sum.detach().double(), out.per_token[answer].sum().double(),
                                 answer.sum().double(), sums.new_tensor(batch_needed)])
            selection += selection_sums(out)
            stats.add(batch, out)
        sums, selection = all_reduce_sum(torch.cat([sums, selection])).split([4, 5])
        nonfinite_in_row = check_finite(engine, skipped_before, sums, step, micro, nonfinite_in_row,
                                        cfg.train.max_nonfinite_steps)
        t1 = time.monotonic()
        step_tokens = sum(b.num_tokens for b in micro) * world.world_size
        tokens_seen += step_tokens
        result.step_times.append((t0, t1))
        result.step_counts.append((sum(b.num_tokens for b in micro),
                                   sum(int((b.task_ids >= 0).sum()) for b in micro), n_local))
        result.step_flops.append((needed, executed))
        result.train_losses.append(float(sums[0] / n_global))
        metrics = {"train/loss": result.train_losses[-1], "train/answer_loss": float(sums[1] / sums[2].clamp(min=1)),
                   "train/lr": engine.get_lr()[0], "train/supervised_tokens": float(n_global),
                   "train/tokens_per_s": step_tokens / (t1 - t0),
                   "train/supervised_tokens_per_s": float(n_global) / (t1 - t0),
                   "train/mfu": float(sums[3]) / (t1 - t0) / (peak * world.world_size),
                   "train/mem": memory_in_use(world.device), "train/skipped_steps": engine.skipped_steps}
        if selective:
            metrics.update(selection_metrics(selection))
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            metrics.update(stats.metrics("train", all_reduce_sum, selective))  # averaged since the last log line
            stats.reset()
            if bar.disable and world.rank == 0:  # plain lines for SLURM logs and pipes
                log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f mfu %.1f%%", step, cfg.train.max_steps,
                         metrics["train/loss"], metrics["train/lr"], metrics["train/tokens_per_s"],
                         100 * metrics["train/mfu"])
        tracker.log_metrics(metrics, step=step)
        history.record(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}",
                        mfu=f"{metrics['train/mfu']:.0%}")
        if trace is not None:
            trace.write(json.dumps({"step": step, "batches": [[b.index, list(b.keys)] for b in micro]}) + "\n")
            trace.flush()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            run_eval(step)
        if probe is not None and (step % cfg.train.probe_every == 0 or step == cfg.train.max_steps):
            probe.record(step, engine.module, world.device)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step != cfg.train.max_steps:
            result.checkpoint = checkpoint(step)
        if fault == ("between_steps", step):
            kill_self()
    bar.close()

    if start_step < cfg.train.max_steps:
        run_eval(cfg.train.max_steps)
        result.checkpoint = checkpoint(cfg.train.max_steps)
    else:
        log.info("already trained to step %d (train.max_steps); nothing to do", start_step)
        result.checkpoint = cfg.checkpoint_dir / step_tag(start_step)
    tracker.finish()
    return result


def enable_activation_checkpointing(lm) -> None:
    """Non-reentrant recomputation per decoder layer (transformers renamed the method in 5.x)."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_probe(cfg: RunConfig, manifest: dict, vocab: Vocab, rank: int, tracker):
    """The fixed probe set: the first validation micro-batches, read alike on every rank."""
    if not cfg.train.probe_every:
        return None
    from sabiscale.track.probe import ProbeRecorder

    stream = make_loader(shard_urls(cfg.shards_dir, manifest, "val"), vocab, cfg.train.micro_batch_size, 0, 1,
                         cfg.seed, 0, 0)
    return ProbeRecorder([next(stream) for _ in range(cfg.train.probe_batches)], vocab, cfg.output_dir / "probe",
                         rank, tracker)


def online_reference(cfg: RunConfig, manifest: dict, device: torch.device):
    """The frozen reference model that scores each micro-batch at training time, when the shards
    carry no reference losses and the recipe asks for it (costs one more forward per micro-batch)."""
    if cfg.loss.kind != "selective" or cfg.loss.reference != "online":
        return None
    from sabiscale.evaluate.score import Reference

    reference = Reference(Path(cfg.loss.reference_checkpoint), device, cfg.loss.chunk_size)
    reference.check_tokenizer(manifest, cfg.shards_dir)
    log.info("online reference model: %s (step %d)", reference.tag_dir, reference.meta["step"])
    return reference


def check_finite(engine, skipped_before: int, sums: torch.Tensor, step: int, micro: list, in_row: int,
                 limit: int) -> int:
    """DeepSpeed skips an optimizer step whose gradient norm is inf/NaN (parameters untouched, LR
    schedule not advanced). Count such steps in a row and stop at `limit`, naming the batches."""
    if engine.skipped_steps == skipped_before and torch.isfinite(sums).all():
        return 0
    in_row += 1
    batches = [b.index for b in micro]
    log.warning("step %d: non-finite loss or gradient (global micro-batches %s); the update was skipped "
                "(%d in a row)", step, batches, in_row)
    if in_row >= limit:
        raise FloatingPointError(
            f"{in_row} optimizer steps in a row had a non-finite loss or gradient (last: step {step}, global "
            f"micro-batches {batches}); lower optim.lr or check those batches (train.trace_samples=true records "
            "their sample keys), then resume from the last checkpoint")
    return in_row


def find_resume_point(cfg: RunConfig, world: World, manifest: dict) -> dict | None:
    """The sidecar of the newest complete checkpoint to continue from, checked against this run."""
    if world.rank == 0:
        for leftover in remove_partial(cfg.checkpoint_dir):
            log.warning("removed %s: an incomplete checkpoint left by a crash during a save", leftover)
    barrier()
    newest = latest_complete(cfg.checkpoint_dir)
    if newest is None:
        if cfg.train.resume == "must":
            raise FileNotFoundError(f"--resume: no complete checkpoint in {cfg.checkpoint_dir}")
        return None
    if cfg.train.resume == "never":
        raise FileExistsError(f"{cfg.checkpoint_dir} already holds checkpoints (newest {newest.name}) and "
                              "train.resume is 'never'; use a new output_dir or train.resume=auto")
    meta, saved_cfg = read_sidecar(newest)
    # rank 0 reads every file once; all ranks learn the verdict, so none is left waiting in a collective
    problem = ""
    if world.rank == 0:
        try:
            check_intact(newest, meta)
        except CheckpointError as err:
            problem = str(err)
    if all_reduce_sum(torch.tensor(float(bool(problem)), device=world.device)) > 0:
        raise CheckpointError(problem or f"rank 0 found {newest} damaged (its log names the files)")
    missing = [k for k in ("world_size", "loader", "rng", "tokens_seen", "tokenizer_sha256") if k not in meta]
    if missing:
        raise ValueError(f"{newest}/sabiscale.json lacks {missing}: it cannot be resumed exactly (written by an "
                         "older sabiscale?); start a new output_dir, or evaluate/export it instead")
    if meta["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
        raise ValueError(f"{newest} was trained with tokenizer {meta['tokenizer_sha256'][:12]}, but the shards in "
                         f"{cfg.shards_dir} use {manifest['tokenizer_sha256'][:12]}; resume with the original "
                         "shards, or start a new run in a new output_dir")
    changed = config_changes(saved_cfg.model, cfg.model)
    if changed:
        raise CheckpointError(f"{newest} holds a model with other dimensions than this run's recipe ({', '.join(changed)}); "
                              "resume with the model settings it was trained with, or start a new output_dir")
    if meta["world_size"] != world.world_size:
        raise ValueError(
            f"{newest} was written by {meta['world_size']} ranks and this run has {world.world_size}: ZeRO "
            "partitions do not re-split by themselves. Resume with the same number of ranks, or convert it with "
            f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {newest} --output_folder "
            f"{newest}_universal` and load that with DeepSpeed's universal checkpoint support "
            "(the data position in sabiscale.json is valid for any world size)")
    return meta


def config_changes(saved, current, prefix: str = "model") -> list[str]:
    """`field: saved -> current` for each field of a config section that differs."""
    old, new = saved.model_dump(mode="json"), current.model_dump(mode="json")
    return [f"{prefix}.{k}: {old[k]} in the checkpoint, {new[k]} now" for k in old if old[k] != new.get(k)]


def load_engine_state(engine, tag_dir: Path) -> None:
    """DeepSpeed's load, with its low-level failures (unpickling, zip, size mismatch) turned into
    one message naming the checkpoint and the way out."""
    try:
        engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as err:  # noqa: BLE001 - re-raised with context, never swallowed
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}\n{way_out(tag_dir)}") from err


def parse_fault(spec: str | None) -> tuple[str, int] | None:
    if spec is None:
        return None
    point, step = spec.split(":")
    return point, int(step)


def open_trace(cfg: RunConfig, rank: int):
    if not cfg.train.trace_samples:
        return None
    path = cfg.output_dir / "trace" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
