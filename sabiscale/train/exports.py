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

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("sabiscale.train")

EXPORT_DIRNAME = "hf"  # inside the checkpoint's tag directory


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
        self.done: list[Path] = []

    def start(self, tag_dir: Path) -> None:
        if not self.enabled:
            return
        self.wait()
        self.target = tag_dir / EXPORT_DIRNAME
        if self.target.exists():  # this step was exported before an interruption
            self.done.append(self.target)
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
            self.done.append(self.target)
            log.info("exported %s in %.1f s (Hugging Face directory; `sabiscale eval %s` scores it)",
                     self.target, time.monotonic() - self.started, self.target)
            self.tracker.set_tags({"export/last": str(self.target)})
        else:  # the checkpoint is whole either way: an export is redone from it by hand
            log.warning("the export of %s failed (exit %d; its output is in %s); the checkpoint is intact: "
                        "`sabiscale export %s %s` makes it again", self.target.parent, code, self.log_path,
                        self.target.parent, self.target)
