"""Fault injection for tests, through the training loop's hook seam (never the recipe): die as
abruptly as `kill -9` would make us, or spoil a loss, at a chosen point of a chosen step.

    POINT:STEP with POINT one of mid_step (after a backward, before its update), between_steps
    (after the step is logged and checkpointed), mid_checkpoint (every file of the save written,
    not yet complete) or nan_loss (the step's loss is NaN).

As a script it runs any sabiscale command with the fault attached, also under the launcher:
    python tests/faults.py --fault=mid_step:5 train RECIPE key=value ...
    deepspeed --num_gpus 2 tests/faults.py --fault=between_steps:3 train RECIPE ...
"""
from __future__ import annotations

import os
import signal
import sys

from sabiscale.train.hooks import TrainHook


class Fault(TrainHook):
    def __init__(self, spec: str) -> None:
        point, step = spec.split(":")
        self.point, self.step = point, int(step)

    def _at(self, point: str, step: int) -> bool:
        return self.point == point and self.step == step

    @staticmethod
    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def after_forward(self, step, out):
        if self._at("nan_loss", step):
            out.loss_sum = out.loss_sum * float("nan")

    def after_backward(self, step):
        if self._at("mid_step", step):
            self.kill()

    def during_checkpoint(self, step):
        if self._at("mid_checkpoint", step):
            self.kill()

    def after_step(self, record):
        if self._at("between_steps", record.step):
            self.kill()


if __name__ == "__main__":
    from sabiscale.cli import main

    faults = [Fault(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--fault=")]
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("--fault=")], hooks=faults))
