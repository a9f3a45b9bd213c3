"""Where a run continues from: the newest complete checkpoint of its run directory, checked
against this run (tokenizer, model dimensions, world size, integrity) before anything loads."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch

from sabiscale.config import RunConfig
from sabiscale.errors import AlreadyExists, MissingInput, UserError
from sabiscale.train.checkpoint import (UNIVERSAL_SUFFIX, CheckpointError, check_intact, latest_complete, read_sidecar,
                                        remove_partial, resolve_checkpoint, way_out)
from sabiscale.train.engine import World, all_reduce_sum, barrier, convert_to_universal

log = logging.getLogger("sabiscale.train")


def find_resume_point(cfg: RunConfig, world: World, manifest: dict) -> dict | None:
    """The sidecar of the newest complete checkpoint to continue from, checked against this run."""
    if world.rank == 0:
        for leftover in remove_partial(cfg.checkpoint_dir):
            log.warning("removed %s: an incomplete checkpoint left by a crash during a save", leftover)
    barrier()
    newest = latest_complete(cfg.checkpoint_dir)
    if newest is None:
        if cfg.train.resume == "must":
            raise MissingInput(f"--resume: no complete checkpoint in {cfg.checkpoint_dir}")
        return None
    if cfg.train.resume == "never":
        raise AlreadyExists(f"{cfg.checkpoint_dir} already holds checkpoints (newest {newest.name}) and "
                            "train.resume is 'never'; use a new output_dir or train.resume=auto")
    meta, saved_cfg = read_sidecar(newest)
    check_intact_on_rank0(newest, meta, world)
    check_matches_run(newest, meta, saved_cfg, cfg, manifest, world)
    return meta


def check_intact_on_rank0(newest: Path, meta: dict, world: World) -> None:
    """Rank 0 reads every file once; all ranks learn the verdict, so none is left waiting in a collective."""
    problem = ""
    if world.rank == 0:
        try:
            check_intact(newest, meta)
        except CheckpointError as err:
            problem = str(err)
    if all_reduce_sum(torch.tensor(float(bool(problem)), device=world.device)) > 0:
        raise CheckpointError(problem or f"rank 0 found {newest} damaged (its log names the files)")


def check_matches_run(newest: Path, meta: dict, saved_cfg: RunConfig, cfg: RunConfig, manifest: dict,
                      world: World) -> None:
    missing = [k for k in ("world_size", "loader", "rng", "tokens_seen", "tokenizer_sha256") if k not in meta]
    if missing:
        raise UserError(f"{newest}/sabiscale.json lacks {missing}: it cannot be resumed exactly (written by an "
                        "older sabiscale?); start a new output_dir, or evaluate/export it instead")
    if meta["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
        raise UserError(f"{newest} was trained with tokenizer {meta['tokenizer_sha256'][:12]}, but the shards in "
                        f"{cfg.shards_dir} use {manifest['tokenizer_sha256'][:12]}; resume with the original "
                        "shards, or start a new run in a new output_dir")
    changed = config_changes(saved_cfg.model, cfg.model)
    if changed:
        raise CheckpointError(f"{newest} holds a model with other dimensions than this run's recipe "
                              f"({', '.join(changed)}); resume with the model settings it was trained with, or "
                              "start a new output_dir")
    if meta["world_size"] != world.world_size and cfg.optim.kind != "adamw":
        raise UserError(
            f"{newest} was written by {meta['world_size']} ranks and this run has {world.world_size}, and its "
            f"optimizer is bitsandbytes' {cfg.optim.kind}: DeepSpeed re-splits checkpoints for another number of "
            "ranks only through its universal format, which holds DeepSpeed's own optimizer states, not a client "
            f"optimizer's 8-bit ones. Resume on {meta['world_size']} ranks (once finished, the model itself can go "
            "anywhere), or start a new run")



def precision_to_resume(requested: str, chosen: str, resumed: dict | None) -> str:
    """The precision of a resumed run: the checkpoint's. DeepSpeed stores optimizer states per
    precision (bf16 ones under other file names), so a run that moved to a machine where auto
    chooses differently (a CPU with native bf16, another GPU) keeps what it was trained in."""
    saved = (resumed or {}).get("precision")  # absent in checkpoints of sabiscale before 2026-12
    if saved is None or saved == chosen:
        return chosen
    if requested == "auto":
        log.info("continuing in %s, the precision the checkpoint was trained in (this device alone would "
                 "choose %s)", saved, chosen)
        return saved
    raise UserError(f"the checkpoint of step {resumed['step']} was trained in {saved}, and engine.precision="
                    f"{requested} cannot resume it (DeepSpeed keeps optimizer states per precision); resume with "
                    f"engine.precision={saved} or auto, or start a new output_dir")

def universal_checkpoint(tag_dir: Path, world: World) -> Path:
    """A checkpoint of another world size, converted once to DeepSpeed's universal format into
    `<tag>_universal/` beside it (by rank 0, atomically through `.partial`; a later resume of the
    same checkpoint reuses it). The data position, RNG, step and MLflow run come from the original
    sidecar, which holds for any number of ranks."""
    out = tag_dir.with_name(f"{tag_dir.name}{UNIVERSAL_SUFFIX}")
    if world.rank == 0 and not (out / "converted").is_file():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log.info("converting %s (written by other ranks) to DeepSpeed's universal checkpoint in %s", tag_dir, out)
        try:
            convert_to_universal(tag_dir, partial)
        except Exception as err:  # noqa: BLE001 - re-raised with the checkpoint named
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"DeepSpeed could not convert {tag_dir} to its universal format "
                                  f"({type(err).__name__}: {err}); resume on the number of ranks that wrote it") from err
        (partial / "converted").write_text(tag_dir.name + "\n", encoding="utf-8")
        (tag_dir.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer: we load by tag
        shutil.rmtree(out, ignore_errors=True)
        os.rename(partial, out)
    barrier()
    return out


@torch.no_grad()
def warm_start(lm, cfg: RunConfig, manifest: dict, gathered=None, rank: int = 0) -> dict:
    """Copy the weights of `train.init_from` into a freshly built model. The checkpoint is read
    lazily, one parameter at a time (DeepSpeed's lazy fp32 state dict over memory-mapped
    partition files; a ZeRO-1/2 checkpoint's flat fp32 vector is merged whole by DeepSpeed). Under
    ZeRO-3 only rank 0 reads: each parameter is gathered with rank 0 as its modifier, so what rank
    0 copies in is what every rank's partition holds afterwards. Returns that checkpoint's sidecar."""
    from sabiscale.train.engine import lazy_state_dict

    tag_dir = resolve_checkpoint(Path(cfg.train.init_from))
    meta, saved_cfg = read_sidecar(tag_dir)
    check_intact(tag_dir, meta)
    if meta["tokenizer_sha256"] != manifest["tokenizer_sha256"]:
        raise UserError(f"train.init_from {tag_dir} was trained with tokenizer {meta['tokenizer_sha256'][:12]}, but "
                        f"the shards in {cfg.shards_dir} use {manifest['tokenizer_sha256'][:12]}; prepare the new data "
                        f"with its tokenizer (tokenizer.path={tag_dir / 'tokenizer' / 'tokenizer.json'})")
    changed = config_changes(saved_cfg.model, cfg.model)
    if changed:
        raise UserError(f"train.init_from {tag_dir} holds a model with other dimensions than this recipe's "
                        f"({', '.join(changed)}); set the recipe's model to the checkpoint's")
    reads = gathered is None or rank == 0
    state = {k.removeprefix("lm."): v for k, v in lazy_state_dict(tag_dir.parent, tag_dir.name).items()} if reads else {}
    for name, param in lm.named_parameters():
        with gathered(param) if gathered is not None else contextlib.nullcontext():
            if reads and param.numel():
                value = state.pop(name)
                param.copy_((value if torch.is_tensor(value) else value.contiguous()).to(param.dtype))
    log.info("weights from %s (step %d): continual pre-training starts at step 0", tag_dir, meta["step"])
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
    if engine.optimizer is not None:
        place_optimizer_state(getattr(engine.optimizer, "optimizer", engine.optimizer))


@torch.no_grad()
def place_optimizer_state(optimizer) -> None:
    """Optimizer state next to its parameters, as torch's own load_state_dict leaves it. DeepSpeed's
    universal-checkpoint load writes the state of the torch optimizer inside ZeRO directly, with
    `step` a CPU tensor; torch's fused (and capturable) AdamW keeps `step` as a float32 tensor on
    the parameter's device and its CUDA kernel refuses anything else at the first step."""
    for group in optimizer.param_groups:
        on_device_step = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    state[key] = (value.to(device=param.device, dtype=torch.float32) if on_device_step
                                  else value.to("cpu"))
                elif value.device != param.device:
                    state[key] = value.to(param.device)
