"""The one seam where instruments attach to the training loop: tests (fault injection), benchmarks
(step timings) and the sample trace. Hooks observe and never do the loop's own work, so the loop
reads top to bottom without them; the one exception is `after_forward`, which may change the
micro-batch's losses in place (tests inject a non-finite loss there). Pass hooks to
`train(cfg, world, hooks=[...])`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sabiscale.data.batch import Batch
from sabiscale.track.metrics import StepSums


@dataclass
class StepRecord:
    """One finished optimizer step, as a hook sees it."""

    step: int
    start: float               # time.monotonic() before the step's first batch was fetched
    end: float                 # ... after its sums were reduced
    micro: list[Batch]         # this rank's micro-batches
    sums: StepSums             # reduced over all ranks
    local_targets: int         # supervised targets this rank counted
    local_flops: tuple[float, float]  # this rank's (needed, executed) FLOPs (track/flops.py)

    @property
    def local_tokens(self) -> tuple[int, int]:
        """This rank's (positions, non-padding tokens)."""
        return (sum(b.num_tokens for b in self.micro), sum(int((b.task_ids >= 0).sum()) for b in self.micro))


class TrainHook:
    """Every method is a no-op; override the ones an instrument needs."""

    def after_forward(self, step: int, out) -> None:
        """A micro-batch's TokenLosses, before its backward (out may be changed in place)."""

    def after_backward(self, step: int) -> None:
        """A micro-batch's backward is done, its optimizer step not yet taken."""

    def during_checkpoint(self, step: int) -> None:
        """Rank 0, inside a save: every file is written, the checkpoint is not yet complete."""

    def after_step(self, record: StepRecord) -> None:
        """The step is logged, evaluated and checkpointed as the recipe asks."""


class Hooks(TrainHook):
    """Several hooks called in order, as one."""

    def __init__(self, hooks=()) -> None:
        self.hooks = list(hooks)

    def after_forward(self, step, out):
        for hook in self.hooks:
            hook.after_forward(step, out)

    def after_backward(self, step):
        for hook in self.hooks:
            hook.after_backward(step)

    def during_checkpoint(self, step):
        for hook in self.hooks:
            hook.during_checkpoint(step)

    def after_step(self, record):
        for hook in self.hooks:
            hook.after_step(record)


class StepRecorder(TrainHook):
    """Every step's record, kept in memory (benchmarks read timings, counts and FLOPs from it)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def after_step(self, record):
        self.records.append(record)


class SampleTrace(TrainHook):
    """train.trace_samples: the global index and sample keys of every micro-batch of every step,
    one JSON line per step in <output_dir>/trace/rank<N>.jsonl (audits of what a run saw)."""

    def __init__(self, output_dir: Path, rank: int) -> None:
        path = output_dir / "trace" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def after_step(self, record):
        batches = [[b.index, list(b.keys)] for b in record.micro]
        self.file.write(json.dumps({"step": record.step, "batches": batches}) + "\n")
        self.file.flush()
