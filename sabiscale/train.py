"""`sabiscale train`: the one training loop.

Per optimizer step, in this order: fetch the step's micro-batches, count their supervised tokens
across all ranks, forward + backward each micro-batch with loss = sum / global count, optimizer
step, log, evaluate, and at the end save a checkpoint. Distributed concerns stay in engine.py;
data order in data/loader.py; the loss in loss/.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import RunConfig, config_to_dict
from .data.loader import make_loader, shard_urls
from .engine import World, all_reduce_sum, initialize, load_ds_config, resolve_precision
from .loss.masked import TokenLossObjective
from .model import build_model, count_parameters, flops_per_token
from .shards.write import read_manifest
from .tokenizer import load_tokenizer, tokenizer_hash
from .tracking import make_tracker

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


def check_inputs(cfg: RunConfig) -> dict:
    """The shards must come from the tokenizer we are about to train with."""
    manifest = read_manifest(cfg.shards_dir)
    ours = tokenizer_hash(cfg.tokenizer_path)
    if manifest["tokenizer_sha256"] != ours:
        raise ValueError(f"{cfg.shards_dir}/manifest.json was written with tokenizer "
                         f"{manifest['tokenizer_sha256'][:12]} but {cfg.tokenizer_path} is {ours[:12]}; "
                         "re-run `sabiscale prepare` so shards and tokenizer match")
    if manifest["seq_len"] != cfg.data.seq_len:
        raise ValueError(f"shards have seq_len {manifest['seq_len']} but data.seq_len is {cfg.data.seq_len}; "
                         "re-run `sabiscale prepare` or set data.seq_len to match")
    return manifest


@torch.no_grad()
def evaluate(objective: torch.nn.Module, batches: list, device: torch.device) -> float:
    """Answer-token (prompt-masked) loss over the given validation micro-batches, across ranks."""
    objective.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        b = batch.to(device)
        loss_sum, count = objective(b.input_ids, b.position_ids, b.loss_mask, kind="masked")
        total += torch.tensor([loss_sum.item(), count.item()], dtype=torch.float64)
    objective.train()
    total = all_reduce_sum(total.to(device)).cpu()
    return float(total[0] / total[1].clamp(min=1))


def _progress(cfg: RunConfig, rank: int):
    interactive = rank == 0 and sys.stderr.isatty()
    return tqdm(total=cfg.train.max_steps, disable=not interactive, dynamic_ncols=True, desc="train")


def train(cfg: RunConfig, world: World) -> TrainResult:
    manifest = check_inputs(cfg)
    tok = load_tokenizer(cfg.tokenizer_path)
    lm = build_model(cfg.model, len(tok), cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    objective = TokenLossObjective(lm, cfg.loss.kind, cfg.loss.chunk_size, tok.pad_token_id)
    precision = resolve_precision(cfg.engine.precision)
    ds_config = load_ds_config(cfg, world.world_size, precision)
    engine = initialize(objective, ds_config)

    loader = make_loader(shard_urls(cfg.shards_dir, manifest, "train"), cfg.train.micro_batch_size,
                         world.rank, world.world_size, cfg.seed, cfg.data.shuffle_buffer, cfg.data.num_workers)
    val_loader = make_loader(shard_urls(cfg.shards_dir, manifest, "val"), cfg.train.micro_batch_size,
                             world.rank, world.world_size, cfg.seed, 0, 0)
    val_batches = [next(val_loader) for _ in range(cfg.train.eval_batches)]

    tracker = make_tracker(cfg, world.rank)
    tracker.log_json(ds_config, "config/deepspeed.json")
    tracker.log_json(manifest, "data/manifest.json")
    n_params = count_parameters(lm)
    body_flops, head_flops = flops_per_token(lm, cfg.data.seq_len)
    tracker.log_metrics({"model/parameters": n_params}, step=0)
    if world.rank == 0:
        log.info("model: %.2fM parameters, precision %s, world size %d, ZeRO stage %s",
                 n_params / 1e6, precision, world.world_size, ds_config["zero_optimization"]["stage"])

    result = TrainResult(steps=cfg.train.max_steps, run_id=tracker.run_id,
                         tracking_uri=getattr(tracker, "uri", None),
                         experiment_id=getattr(tracker, "experiment_id", None))
    result.eval_answer_loss[0] = evaluate(engine.module, val_batches, world.device)
    tracker.log_metrics({"eval/answer_loss": result.eval_answer_loss[0]}, step=0)
    gas = cfg.train.grad_accum_steps
    tokens_seen = 0
    bar = _progress(cfg, world.rank)
    for step in range(1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        micro = [next(loader).to(world.device) for _ in range(gas)]
        n_global = all_reduce_sum(torch.tensor(float(sum(b.supervised_targets() for b in micro)), device=world.device))
        # DeepSpeed divides by gas and averages over ranks; undo that so the gradient is
        # sum(token losses) / global supervised count, whatever the split.
        scale = gas * world.world_size / n_global.clamp(min=1)
        loss_sum_local = torch.zeros((), device=world.device)
        for batch in micro:
            loss_sum, _ = engine(batch.input_ids, batch.position_ids, batch.loss_mask)
            engine.backward(loss_sum * scale)
            engine.step()
            loss_sum_local += loss_sum.detach()
        loss = float(all_reduce_sum(loss_sum_local) / n_global.clamp(min=1))
        elapsed = time.perf_counter() - t0
        step_tokens = sum(b.num_tokens for b in micro) * world.world_size
        tokens_seen += step_tokens
        result.train_losses.append(loss)
        metrics = {"train/loss": loss, "train/lr": engine.get_lr()[0],
                   "train/supervised_tokens": float(n_global),
                   "train/tokens_per_s": step_tokens / elapsed,
                   "train/supervised_tokens_per_s": float(n_global) / elapsed,
                   "train/flops_per_s": (body_flops * step_tokens + head_flops * float(n_global)) / elapsed}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        tracker.log_metrics(metrics, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
        if world.rank == 0 and (step % cfg.train.log_every == 0 or step == 1) and bar.disable:
            log.info("step %d/%d loss %.4f lr %.2e tokens/s %.0f", step, cfg.train.max_steps, loss,
                     metrics["train/lr"], metrics["train/tokens_per_s"])
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            result.eval_answer_loss[step] = evaluate(engine.module, val_batches, world.device)
            tracker.log_metrics({"eval/answer_loss": result.eval_answer_loss[step]}, step=step)
    bar.close()

    result.eval_answer_loss[cfg.train.max_steps] = evaluate(engine.module, val_batches, world.device)
    tracker.log_metrics({"eval/answer_loss": result.eval_answer_loss[cfg.train.max_steps]}, step=cfg.train.max_steps)
    client_state = {"tokens_seen": tokens_seen, "config": config_to_dict(cfg),
                    "tokenizer_sha256": manifest["tokenizer_sha256"],
                    "manifest_sha256": _manifest_hash(cfg.shards_dir), "mlflow_run_id": tracker.run_id}
    result.checkpoint = save_checkpoint(engine, cfg.checkpoint_dir, cfg.train.max_steps, client_state)
    tracker.set_tags({"checkpoint": str(result.checkpoint.resolve())})
    tracker.finish()
    return result


def _manifest_hash(shards_dir: Path) -> str:
    return hashlib.sha256((shards_dir / "manifest.json").read_bytes()).hexdigest()
