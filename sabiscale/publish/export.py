"""`sabiscale export`: a checkpoint -> a Hugging Face model directory with its model card (the
way back, for `sabiscale eval`, is train/exports.py::load_exported_lm)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sabiscale.config import build_config
from sabiscale.errors import AlreadyExists
from sabiscale.prep.corpus import SplitRule
from sabiscale.prep.fingerprint import FINGERPRINTS
from sabiscale.publish.card import write_publishing_files
from sabiscale.train.checkpoint import SIDECAR, load_trained_lm, resolve_checkpoint
from sabiscale.train.exports import EXPORT_KIND


@torch.no_grad()
def export_hf(path: Path, out_dir: Path) -> Path:
    """A standard Hugging Face directory: save_pretrained weights + config + the tokenizer with
    its task tags, loadable offline with AutoModelForCausalLM / AutoTokenizer. Written into
    `<out_dir>.partial` and renamed when whole, so an interrupted export never looks finished."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AlreadyExists(f"{out_dir} exists and is not empty; choose a new directory (nothing was overwritten)")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier export of ours that was cut off
    write_export(path, partial)
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    os.rename(partial, out_dir)
    return out_dir


def write_export(path: Path, out_dir: Path) -> None:
    lm, tok, meta = load_trained_lm(path)
    lm.config.use_cache = True  # for generation by users; training packs and turns it off
    lm.set_attn_implementation("sdpa")  # sabiscale's packed attention is not in plain transformers
    lm.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    cfg = build_config(meta["config"], origin=str(path))
    write_publishing_files(out_dir, lm, tok, cfg, meta, resolve_checkpoint(path))
    # what training saw and which records it held out travel with the model, so `eval --harness`
    # on the export scores the same held-out, uncontaminated records as `sabiscale eval`
    fingerprints = cfg.shards_dir / FINGERPRINTS
    if fingerprints.is_file():
        shutil.copyfile(fingerprints, out_dir / FINGERPRINTS)
    for written in out_dir.iterdir():  # safetensors writes 0600; a model is handed to others
        if written.is_file():
            written.chmod(0o644)
    facts = {"kind": EXPORT_KIND, **{k: meta[k] for k in ("step", "tokenizer_sha256", "mlflow_run_id") if k in meta}}
    facts["split_rule"] = SplitRule.of(cfg.data).describe()
    facts["task_defs"] = {k: v.model_dump() for k, v in cfg.data.task_defs.items()}
    facts["config"] = meta["config"]  # the run's tasks, languages and data, for `sabiscale eval EXPORT`
    (out_dir / SIDECAR).write_text(json.dumps(facts, indent=2) + "\n")
