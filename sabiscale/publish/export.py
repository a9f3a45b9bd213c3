"""`sabiscale export`: a checkpoint -> a Hugging Face model directory with its model card."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sabiscale.config import build_config
from sabiscale.errors import AlreadyExists
from sabiscale.prep.corpus import SplitRule
from sabiscale.prep.fingerprint import FINGERPRINTS
from sabiscale.publish.card import write_publishing_files
from sabiscale.train.checkpoint import load_trained_lm, resolve_checkpoint


@torch.no_grad()
def export_hf(path: Path, out_dir: Path) -> Path:
    """A standard Hugging Face directory: save_pretrained weights + config + the tokenizer with
    its task tags, loadable offline with AutoModelForCausalLM / AutoTokenizer."""
    lm, tok, meta = load_trained_lm(path)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AlreadyExists(f"{out_dir} exists and is not empty; choose a new directory (nothing was overwritten)")
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
    facts = {k: meta[k] for k in ("step", "tokenizer_sha256", "mlflow_run_id") if k in meta}
    facts["split_rule"] = SplitRule.of(cfg.data).describe()
    facts["task_defs"] = {k: v.model_dump() for k, v in cfg.data.task_defs.items()}
    (out_dir / "sabiscale.json").write_text(json.dumps(facts, indent=2) + "\n")
    return out_dir
