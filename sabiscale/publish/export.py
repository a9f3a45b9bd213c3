"""`sabiscale export`: a checkpoint -> a Hugging Face model directory with its model card; and
the way back, an export -> the model `sabiscale eval` scores."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sabiscale.config import build_config
from sabiscale.errors import AlreadyExists, UserError
from sabiscale.prep.corpus import SplitRule
from sabiscale.prep.fingerprint import FINGERPRINTS
from sabiscale.publish.card import write_publishing_files
from sabiscale.train.checkpoint import SIDECAR, fit_weights, load_trained_lm, read_sidecar, resolve_checkpoint

EXPORT_KIND = "sabiscale-export"  # in an export's sabiscale.json, which a checkpoint's sidecar never says


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


def is_export(path: Path) -> bool:
    facts = Path(path) / SIDECAR
    if not (facts.is_file() and (Path(path) / "config.json").is_file()):
        return False
    try:
        return json.loads(facts.read_text(encoding="utf-8")).get("kind") == EXPORT_KIND
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


@torch.no_grad()
def load_exported_lm(export_dir: Path):
    """(the model as sabiscale builds it, with the export's weights; its tokenizer; its facts), so
    `sabiscale eval` scores an export exactly as it scores the checkpoint it came from."""
    from safetensors.torch import load_file

    from sabiscale.model.build import build_model
    from sabiscale.prep.tokenizer import load_tokenizer

    export_dir = Path(export_dir)
    if "config" not in json.loads((export_dir / SIDECAR).read_text(encoding="utf-8")):
        raise UserError(f"{export_dir / SIDECAR} was written by an earlier sabiscale and does not carry the run's "
                        "config; score this export with `sabiscale eval --harness`, or export the checkpoint again")
    meta, cfg = read_sidecar(export_dir)
    tok = load_tokenizer(export_dir / "tokenizer.json")
    lm = build_model(cfg.model, len(tok), cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, cfg.seed)
    state = {}
    for shard in sorted(export_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    fit_weights(lm, state, cfg, export_dir)
    return lm.float().eval(), tok, meta
