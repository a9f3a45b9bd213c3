"""Save and load training checkpoints.

A checkpoint is DeepSpeed's own (model, optimizer, scheduler, ZeRO partitions per rank) plus, in
the same tag directory, what sabiscale needs to resume or use it without the run directory:
    {output_dir}/checkpoints/{tag}/sabiscale.json   step, tokens seen, loader position, RNG state,
                                                    world size, resolved config, tokenizer and
                                                    manifest hashes, MLflow run id (JSON, no pickle)
    {output_dir}/checkpoints/{tag}/tokenizer/       the run's tokenizer
and `latest` in checkpoints/ naming the newest tag. Saves are atomic (see save_checkpoint). The
checkpoint directory must be on a filesystem every rank sees (as on SLURM clusters).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import torch

from sabiscale.config import RunConfig, build_config
from sabiscale.hashing import sha256_files
from sabiscale.model.build import build_model
from sabiscale.prep.tokenizer import load_tokenizer
from sabiscale.errors import MissingInput, NoSpace, UserError

CLIENT_STATE_VERSION = 1
SIDECAR = "sabiscale.json"
TAG_PATTERN = re.compile(r"step_[0-9]{8}")
UNIVERSAL_SUFFIX = "_universal"  # a checkpoint converted for another number of ranks (train/resume.py)


class CheckpointError(UserError):
    """A checkpoint that cannot be used as it is; the message says which file and what to do."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict, tokenizer_dir: Path,
                    rank: int, keep_last: int = 0, keep_every: int = 0, before_complete=None) -> Path:
    """Write atomically: every rank writes its partitions into `<tag>.partial/`; rank 0 adds the
    sidecar and tokenizer, renames the directory to `<tag>/` and only then points `latest` at it.
    A crash at any point leaves the previous checkpoint as the newest complete one.
    `before_complete` is called on rank 0 with every file written, just before the rename (hooks)."""
    from sabiscale.train.engine import barrier

    tag = step_tag(step)
    partial, final = checkpoint_dir / f"{tag}.partial", checkpoint_dir / tag
    state = {"client_state_version": CLIENT_STATE_VERSION, "step": step, **client_state}
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=partial.name, client_state=state, save_latest=False)
        barrier()
        if rank == 0:
            shutil.copytree(tokenizer_dir, partial / "tokenizer", dirs_exist_ok=True)
            state["files"] = file_inventory(partial)  # every rank's files are written (barrier above)
            (partial / SIDECAR).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            if before_complete is not None:
                before_complete()
            if final.exists():  # the same step saved again after a resume: replace it whole
                shutil.rmtree(final)
            os.rename(partial, final)
            _write_atomically(checkpoint_dir / "latest", tag)
            prune(checkpoint_dir, keep_last, keep_every)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_complete(checkpoint_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        free = shutil.disk_usage(checkpoint_dir).free / 2**20
        raise NoSpace(f"could not write checkpoint {final} ({err}; {free:.1f} MiB free there); {kept}; "
                      "free disk space (or point output_dir elsewhere) and run the same command to resume") from err
    barrier()
    return final


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Tag directories with a sidecar (written last before the rename), oldest first. Only exact
    `step_NNNNNNNN` names count, so a directory moved aside (`step_..damaged`) is never resumed."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob("step_*") if TAG_PATTERN.fullmatch(p.name) and p.is_dir()
                  and (p / SIDECAR).is_file())


def latest_complete(checkpoint_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def prune(checkpoint_dir: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest `keep_last` (0 = all) and every `keep_every`-th step; remove the rest."""
    found = complete_checkpoints(checkpoint_dir)
    if keep_last <= 0:
        return
    for path in found[:-keep_last]:
        step = json.loads((path / SIDECAR).read_text())["step"]
        if not (keep_every and step % keep_every == 0):
            shutil.rmtree(path)
            shutil.rmtree(path.with_name(path.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def file_inventory(tag_dir: Path) -> dict[str, dict]:
    """relative path -> size and sha256 of every file of a checkpoint (but the sidecar itself).
    Recorded at save, checked before any load: a truncated or altered file is then named with
    its expected size instead of surfacing as an unpickling error deep inside DeepSpeed."""
    files = [p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != SIDECAR]
    return {p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(files, sha256_files(files))}


def damaged_files(tag_dir: Path, recorded: dict[str, dict]) -> list[str]:
    """What differs from the inventory recorded at save, one line per file ([] = intact)."""
    problems, to_hash = [], []
    for rel, want in recorded.items():
        path = tag_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif (size := path.stat().st_size) != want["bytes"]:
            problems.append(f"{rel}: {size} bytes, {want['bytes']} when saved (truncated or overwritten)")
        else:
            to_hash.append(rel)
    for rel, digest in zip(to_hash, sha256_files([tag_dir / rel for rel in to_hash])):
        if digest != recorded[rel]["sha256"]:
            problems.append(f"{rel}: content differs from what was saved (sha256 mismatch)")
    return problems


def check_intact(tag_dir: Path, meta: dict) -> None:
    """Raise CheckpointError naming each damaged file and the way out; checkpoints written before
    the inventory existed are let through (DeepSpeed's own load errors are wrapped instead)."""
    problems = damaged_files(tag_dir, meta.get("files", {}))
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged; nothing was loaded or changed:\n  "
                              + "\n  ".join(problems) + "\n" + way_out(tag_dir))


def way_out(tag_dir: Path) -> str:
    """What to do with an unusable checkpoint: fall back to the previous one by moving this aside."""
    older = [p for p in complete_checkpoints(tag_dir.parent) if p.name < tag_dir.name]
    if older:
        return (f"the previous complete checkpoint is {older[-1]}: move the damaged one aside "
                f"(mv {tag_dir} {tag_dir}.damaged) and run the same command to continue from {older[-1].name}")
    return "there is no earlier checkpoint here: restore the files from a copy, or start again in a new output_dir"


def remove_partial(checkpoint_dir: Path) -> list[Path]:
    """Leftovers of a crash during a save: never loadable, removed before resuming."""
    leftovers = sorted(checkpoint_dir.glob("*.partial")) if checkpoint_dir.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def restore_rng(encoded: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


def resolve_checkpoint(path: Path) -> Path:
    """Accept a tag directory or a checkpoints/ directory (then take the newest complete one)."""
    path = Path(path)
    if (path / SIDECAR).is_file():
        if (path / "config.json").is_file() and not (path / "tokenizer").is_dir():
            raise MissingInput(f"{path} is a Hugging Face export, not a training checkpoint: `sabiscale eval` and "
                               "`eval --harness` take it; to train on from it, give its checkpoint (train.init_from)")
        return path
    newest = latest_complete(path)
    if newest is not None:
        return newest
    raise MissingInput(f"{path} is not a sabiscale checkpoint (no {SIDECAR}, no `latest` pointing to one); "
                            "pass a checkpoints/step_XXXXXXXX directory written by `sabiscale train`")


def read_sidecar(tag_dir: Path) -> tuple[dict, RunConfig]:
    try:
        meta = json.loads((tag_dir / SIDECAR).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{tag_dir / SIDECAR} is not valid JSON ({err}); the checkpoint is damaged. "
                              + way_out(tag_dir)) from None
    return meta, build_config(meta["config"], origin=str(tag_dir / SIDECAR))


def load_trained_lm(path: Path):
    """(causal LM in fp32 with the trained weights, its tokenizer, sidecar metadata), from any ZeRO
    stage: DeepSpeed's zero_to_fp32 consolidates the partitions of every rank."""
    from sabiscale.train.engine import consolidated_state_dict

    tag_dir = resolve_checkpoint(path)
    meta, cfg = read_sidecar(tag_dir)
    check_intact(tag_dir, meta)
    tok = load_tokenizer(tag_dir / "tokenizer" / "tokenizer.json")
    lm = build_model(cfg.model, len(tok), cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    state = consolidated_state_dict(tag_dir.parent, tag_dir.name)
    # the engine wrapped the LM in the loss objective: its keys carry an "lm." prefix
    fit_weights(lm, {k.removeprefix("lm."): v for k, v in state.items()}, cfg, tag_dir)
    return lm.float().eval(), tok, meta


def fit_weights(lm, state: dict, cfg: RunConfig, source: Path) -> None:
    """Load `state` into `lm` whole, or say why the weights do not fit the recipe's model."""
    try:
        missing, unexpected = lm.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: the sidecar's model config is not the one trained
        raise CheckpointError(f"{source}: the weights do not fit the model described in its {SIDECAR} "
                              f"({str(err).splitlines()[-1].strip()}); was the sidecar copied from another run?") from None
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not fit the model in its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.model.tie_embeddings:
        lm.tie_weights()
