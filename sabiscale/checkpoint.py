"""Save and load training checkpoints.

A checkpoint is DeepSpeed's own (model, optimizer, scheduler, ZeRO partitions per rank) plus, in
the same tag directory, what sabiscale needs to use it without the run directory:
    {output_dir}/checkpoints/{tag}/sabiscale.json   step, resolved config, tokenizer and manifest
                                                    hashes, MLflow run id (JSON, no pickle)
    {output_dir}/checkpoints/{tag}/tokenizer/       the run's tokenizer
and `latest` in checkpoints/ naming the tag (written by DeepSpeed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import RunConfig, build_config
from .model import build_model
from .tokenizer import load_tokenizer

CLIENT_STATE_VERSION = 1
SIDECAR = "sabiscale.json"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict, tokenizer_dir: Path,
                    rank: int) -> Path:
    """Every rank must call this (ZeRO partitions are written per rank); rank 0 adds the sidecar."""
    tag = step_tag(step)
    state = {"client_state_version": CLIENT_STATE_VERSION, "step": step, **client_state}
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=state)
    tag_dir = checkpoint_dir / tag
    if rank == 0:
        shutil.copytree(tokenizer_dir, tag_dir / "tokenizer", dirs_exist_ok=True)
        (tag_dir / SIDECAR).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return tag_dir


def resolve_checkpoint(path: Path) -> Path:
    """Accept a tag directory or a checkpoints/ directory (then follow `latest`)."""
    path = Path(path)
    if (path / SIDECAR).is_file():
        return path
    latest = path / "latest"
    if latest.is_file() and (path / latest.read_text().strip() / SIDECAR).is_file():
        return path / latest.read_text().strip()
    raise FileNotFoundError(f"{path} is not a sabiscale checkpoint (no {SIDECAR}, no `latest` pointing to one); "
                            "pass a checkpoints/step_XXXXXXXX directory written by `sabiscale train`")


def read_sidecar(tag_dir: Path) -> tuple[dict, RunConfig]:
    meta = json.loads((tag_dir / SIDECAR).read_text(encoding="utf-8"))
    return meta, build_config(meta["config"], origin=str(tag_dir / SIDECAR))


def load_trained_lm(path: Path):
    """(causal LM in fp32 with the trained weights, its tokenizer, sidecar metadata), from any ZeRO
    stage: DeepSpeed's zero_to_fp32 consolidates the partitions of every rank."""
    from .engine import consolidated_state_dict

    tag_dir = resolve_checkpoint(path)
    meta, cfg = read_sidecar(tag_dir)
    tok = load_tokenizer(tag_dir / "tokenizer" / "tokenizer.json")
    lm = build_model(cfg.model, len(tok), cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    state = consolidated_state_dict(tag_dir.parent, tag_dir.name)
    # the engine wrapped the LM in the loss objective: its keys carry an "lm." prefix
    state = {k.removeprefix("lm."): v for k, v in state.items()}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{tag_dir}: checkpoint does not fit the model in its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.model.tie_embeddings:
        lm.tie_weights()
    return lm.float().eval(), tok, meta


@torch.no_grad()
def export_hf(path: Path, out_dir: Path) -> Path:
    """A standard Hugging Face directory: save_pretrained weights + config + the tokenizer with
    its task tags, loadable offline with AutoModelForCausalLM / AutoTokenizer."""
    lm, tok, meta = load_trained_lm(path)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory (nothing was overwritten)")
    lm.config.use_cache = True  # for generation by users; training packs and turns it off
    lm.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    (out_dir / "sabiscale.json").write_text(json.dumps({k: meta[k] for k in ("step", "tokenizer_sha256", "mlflow_run_id") if k in meta}, indent=2) + "\n")
    return out_dir
