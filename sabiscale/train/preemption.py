"""Preemption: SIGTERM (Slurm's preemption and scancel, or any scheduler's stop) and SIGUSR1
(`#SBATCH --signal=USR1@120`, Slurm's warning before the time limit) ask training to stop. The
current step finishes, every rank agrees at the step's end (the request travels with the step's
sums, no extra collective), a checkpoint is saved, the MLflow run is marked KILLED and the
process exits with PREEMPTED_EXIT, which launch/slurm.sbatch answers with `scontrol requeue`: the
job comes back and `sabiscale train` resumes from that checkpoint."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("sabiscale.train")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: a temporary failure; run the same command again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a signal after saving a checkpoint; the same command resumes it."""

    def __init__(self, step: int, checkpoint, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} saved; "
                         "run the same command again to resume (launch/slurm.sbatch requeues the job)")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


class StopRequest:
    """Records a stop signal instead of dying at it; handlers are installed only in the main thread
    and restored when training ends."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("received %s: finishing this step, then saving a checkpoint and stopping",
                        signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
