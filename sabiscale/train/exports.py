"""train.export_every: a Hugging Face export of a checkpoint while training goes on.

Rank 0 starts `sabiscale export <checkpoint> <checkpoint>/hf` as a child process once the
checkpoint is complete and returns to training at once, so no rank waits for the export. The
child consolidates the ZeRO partitions from the checkpoint's files (any stage, any number of
ranks), writes `hf.partial/` and renames it to `hf/` when whole (publish/export.py), so an export
is atomic like the checkpoint and is pruned with it. The one wait: before the next checkpoint (its
pruning may remove the directory being read) and at the end of the run, rank 0 lets a running
export finish, so training never stalls by more than one export at a time.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sabiscale.train.checkpoint import SIDECAR

log = logging.getLogger("sabiscale.train")

EXPORT_DIRNAME = "hf"  # inside the checkpoint's tag directory
EXPORT_KIND = "sabiscale-export"  # in an export's sabiscale.json, which a checkpoint's sidecar never says


def export_env() -> dict[str, str]:
    """The child is a plain one-process command: no launcher variables (it must not join the
    process group), no GPU (the memory is training's), one thread (the cores are training's)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


class BackgroundExport:
    """At most one export in flight (rank 0 only); `tracker` gets an `export/last` tag per export done."""

    def __init__(self, log_path: Path, tracker, enabled: bool) -> None:
        self.log_path, self.tracker, self.enabled = log_path, tracker, enabled
        self.process: subprocess.Popen | None = None
        self.target: Path | None = None
        self.started = 0.0

    def start(self, tag_dir: Path) -> None:
        if not self.enabled:
            return
        self.wait()
        self.target = tag_dir / EXPORT_DIRNAME
        if self.target.exists():  # this step was exported before an interruption
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as out:
            out.write(f"--- export of {tag_dir}\n")
            out.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "sabiscale", "export", str(tag_dir), str(self.target)],
                                            stdout=out, stderr=subprocess.STDOUT, env=export_env())
        self.started = time.monotonic()

    def poll(self) -> None:
        """Report an export that has finished, without waiting."""
        if self.process is not None and self.process.poll() is not None:
            self._finished()

    def wait(self) -> None:
        """Let a running export finish (before a checkpoint may prune its source, and at the end)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            t0 = time.monotonic()
            self.process.wait()
            log.info("waited %.1f s for the export of %s to finish", time.monotonic() - t0, self.target.parent.name)
        self._finished()

    def _finished(self) -> None:
        code, self.process = self.process.returncode, None
        if code == 0:
            log.info("exported %s in %.1f s (Hugging Face directory; `sabiscale eval %s` scores it)",
                     self.target, time.monotonic() - self.started, self.target)
            self.tracker.set_tags({"export/last": str(self.target)})
        else:  # the checkpoint is whole either way: an export is redone from it by hand
            log.warning("the export of %s failed (exit %d; its output is in %s); the checkpoint is intact: "
                        "`sabiscale export %s %s` makes it again", self.target.parent, code, self.log_path,
                        self.target.parent, self.target)


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

    from sabiscale.errors import UserError
    from sabiscale.model.build import build_model
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.train.checkpoint import fit_weights, read_sidecar

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
