"""Tracking behind a small interface: MLflow on global rank 0, a no-op everywhere else.

One MLflow run per training run (never one per rank). The store is `tracking.uri` from the recipe,
else MLFLOW_TRACKING_URI (resolved at the CLI edge), else a sqlite file in the run directory.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sabiscale.config import RunConfig, config_to_dict
from sabiscale.errors import MissingInput, UserError
from sabiscale.lock import DirectoryLock
from sabiscale.track.journal import JOURNAL_NAME, Journal, JournalState, now_ms, send_pending, snapshot_path

log = logging.getLogger("sabiscale.tracking")

# MLflow refuses longer parameter values; those go into an artifact instead.
MAX_PARAM_LENGTH = 6000


class Tracker(Protocol):
    run_id: str | None         # the MLflow run (None: tracking off, or the store never answered)
    uri: str | None            # the store it logs to
    experiment_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def log_json(self, data: dict, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_checkpoint(self, path: Path, upload: bool) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id: str | None = None
    uri: str | None = None
    experiment_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def log_json(self, data: dict, name: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_checkpoint(self, path: Path, upload: bool) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def default_run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_page(ui: str, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI page of one run (its metrics, parameters, artifacts and plots)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MLflowTracker:
    """MLflow that never stops training and loses nothing. Every record goes to the run's journal
    (track/journal.py) and then to the store. When the store is unreachable (at start or mid-run)
    it warns once, keeps journaling, retries every `tracking.retry_seconds`, and when the store
    answers creates the run if it did not exist yet and sends everything in order. What never got
    through stays in the journal for `sabiscale tracking sync RUN_DIR`."""

    def __init__(self, cfg: RunConfig, resuming: bool = False) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = cfg.tracking.uri or default_tracking_uri(cfg.output_dir)
        self.retry_seconds = cfg.tracking.retry_seconds
        self._client = MlflowClient(tracking_uri=self.uri)  # a client sets no process-wide state
        self._system_metrics = cfg.tracking.system_metrics
        self._monitor = None
        self._down_since: float | None = None
        self._next_try = 0.0
        # Records reach the journal (a local file) on the step; a sender thread takes them to the
        # store, so a slow or unreachable store never stalls training. `_lock` serialises sending;
        # the journal has its own lock for appends.
        self._lock = threading.RLock()
        self._finished = False
        self._wake = threading.Event()
        self._stopping = False
        self.journal = open_journal(cfg, resuming)
        cfg = self._settle_store(cfg)
        self._start(cfg)
        self._send()  # the run is created before training starts, when the store answers
        self._sender = threading.Thread(target=self._send_in_background, name="sabiscale-tracking", daemon=True)
        self._sender.start()

    @property
    def run_id(self) -> str | None:
        return self.journal.state.run_id

    @property
    def experiment_id(self) -> str | None:
        return self.journal.state.experiment_id

    def _settle_store(self, cfg: RunConfig) -> RunConfig:
        """A resume given another store than the one its MLflow run lives in: log on to the run
        where it is (tracking.on_store_change=continue), or start a new run in the given store
        (new_run). Either way the log says which; the store is never called unreachable for it."""
        from mlflow.tracking import MlflowClient

        home = self.journal.state.run_uri
        if self.journal.state.run_id is None or home is None or home == self.uri:
            return cfg
        if cfg.tracking.on_store_change == "continue":
            log.warning("MLflow run %s lives in %s, where it was created; this resume logs on to it there, not to %s "
                        "(to start a new MLflow run in %s instead, add tracking.on_store_change=new_run)",
                        self.journal.state.run_id, home, self.uri, self.uri)
            self.uri = home
            self._client = MlflowClient(tracking_uri=home)
            return cfg
        old = self.journal.state.run_id
        self.journal = open_journal(cfg, resuming=False, new_run=True)
        log.warning("tracking.on_store_change=new_run: MLflow run %s stays in %s with the steps it has; this resume "
                    "logs to a new run in %s from here on", old, home, self.uri)
        cfg = cfg.model_copy(deep=True)
        cfg.tracking.run_id = None
        return cfg

    def _start(self, cfg: RunConfig) -> None:
        # the default local store keeps its artifacts in the run directory too, not in ./mlruns of
        # whatever directory the command ran in
        local = (cfg.output_dir / "mlruns").resolve().as_uri() if cfg.tracking.uri is None else None
        continued = self.journal.state.count or cfg.tracking.run_id
        self.journal.add({"op": "start", "uri": self.uri, "experiment": cfg.tracking.experiment or cfg.name,
                          "artifact_location": local, "run_name": default_run_name(cfg),
                          "run_id": cfg.tracking.run_id, "journal_id": uuid.uuid4().hex, "time_ms": now_ms()})
        if continued:  # a continued run keeps its parameters; metrics go on from its last step
            return
        params = flatten(config_to_dict(cfg))
        long = {k: v for k, v in params.items() if len(v) > MAX_PARAM_LENGTH}
        self.journal.add({"op": "params", "params": {k: v for k, v in params.items() if k not in long}})
        if long:
            self.log_json(long, "long_params.json")
        self.log_json(config_to_dict(cfg), "config/resolved_config.json")
        if cfg.recipe is not None and Path(cfg.recipe).is_file():  # the recipe as written and the tokenizer:
            self.log_artifact(Path(cfg.recipe).resolve(), "config")  # the run reproduces from its page
        if cfg.tokenizer_path.is_file():
            self.log_artifact(cfg.tokenizer_path.parent.resolve(), "tokenizer")

    def _unreachable(self, err: Exception) -> None:
        if self._down_since is None:
            log.warning("tracking store %s unreachable (%s): training continues; everything is kept in %s and sent "
                        "when the store answers (tried every %.0f s)", self.uri, err, self.journal.path,
                        self.retry_seconds)
            self._down_since = time.monotonic()
        self._next_try = time.monotonic() + self.retry_seconds

    def _send_in_background(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=1.0)  # new records wake it; the timeout paces retries to a down store
            self._wake.clear()
            if not self._stopping:
                with self._lock:
                    self._send()

    def flush(self) -> None:
        """Send what is pending now, in this thread (what the sender thread would do next)."""
        with self._lock:
            self._send()

    def _send(self, force: bool = False) -> None:
        if not self.journal.pending() or (not force and time.monotonic() < self._next_try):
            return
        had_run = self.run_id is not None
        try:
            sent = send_pending(self.journal, self._client, self.uri)
        except Exception as err:  # noqa: BLE001 - any failure of the store must not stop training
            self._unreachable(err)
            return
        if not had_run:
            log.info("MLflow run %s created in %s", self.run_id, self.uri)
        if self._monitor is None and self._system_metrics:
            self._start_system_metrics()
        if self._down_since is not None:
            log.warning("tracking store reachable again: %d kept records sent", sent)
            self._down_since = None

    def _start_system_metrics(self) -> None:
        """MLflow's own CPU/memory/disk/GPU sampling, once the run exists (sampled live, not journaled)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - optional sampling (psutil) must not stop training
            log.warning("MLflow system metrics not sampled: %s", err)
            self._system_metrics = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # a resumed run replays the steps after its checkpoint with the same values: the store already has them
        last = self.journal.state.last_step
        fresh = {k: float(v) for k, v in metrics.items() if step > last.get(k, -1)}
        if fresh:
            self._record({"op": "metrics", "step": step, "time_ms": now_ms(), "metrics": fresh})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._record({"op": "artifact", "path": str(Path(path).resolve()), "folder": folder})

    def log_json(self, data: dict, name: str) -> None:
        self._record({"op": "json", "data": data, "name": name})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record({"op": "tags", "tags": tags})

    def _record(self, record: dict) -> None:
        if self._finished:  # a late tag from another thread: the run is closed
            log.info("not recorded, the run is finished: %s", record)
            return
        self.journal.add(record)
        self._wake.set()

    def log_checkpoint(self, path: Path, upload: bool) -> None:
        self.set_tags({"checkpoint": str(path.resolve())})
        if upload:
            self.log_artifact(path, f"checkpoints/{path.name}")

    def finish(self, status: str = "FINISHED") -> None:
        self._stopping = True
        self._wake.set()
        self._sender.join()
        with self._lock:
            self._finish(status)

    def _finish(self, status: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()
        self.journal.add({"op": "status", "status": status, "time_ms": now_ms()})
        self._send(force=True)
        if self.journal.pending():
            log.warning("%d tracking records could not reach %s; they are kept in %s: once the store is up, "
                        "`sabiscale tracking sync %s` sends them (run %s)", self.journal.pending(), self.uri,
                        self.journal.path, self.journal.path.parent, self.run_id or "not created yet")
        self.journal.close()


def open_journal(cfg: RunConfig, resuming: bool, new_run: bool = False) -> Journal:
    """The run's journal, read once. A resumed run continues it, and so does a restart from step 0
    of the same configuration that never finished (killed before its first checkpoint: the same
    run, replaying the same steps). Any other run starting from step 0 (or `new_run`) starts a new
    journal; the earlier one is moved aside, never deleted, and named if it holds records never sent."""
    path = cfg.output_dir / JOURNAL_NAME
    journal = Journal(path)
    if not new_run and (resuming or not journal.state.count or same_unfinished_run(journal.state, cfg)):
        return journal
    journal.close()
    aside = path.with_name(f"tracking_journal.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.jsonl")
    path.rename(aside)
    if snapshot_path(path).is_file():
        snapshot_path(path).rename(snapshot_path(aside))
    if journal.pending():
        log.warning("%s held %d records of an earlier run that never reached the store: `sabiscale tracking sync "
                    "%s` sends them", aside, journal.pending(), aside)
    return Journal(path)


def same_unfinished_run(state: JournalState, cfg: RunConfig) -> bool:
    current = json.loads(json.dumps(config_to_dict(cfg)))
    return state.first_config is not None and state.first_config == current and state.last_status != "FINISHED"


@dataclass
class SyncResult:
    sent: int
    run_id: str | None
    experiment_id: str | None
    uri: str


def sync(where: Path, uri: str | None = None) -> SyncResult:
    """Deliver what a run's journal holds and its store never received; safe to repeat."""
    from mlflow.tracking import MlflowClient

    path = where / JOURNAL_NAME if where.is_dir() else where
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: give a run directory (output_dir) or a tracking journal file")
    with DirectoryLock(path.parent, "tracking sync"):
        journal = Journal(path)
        state = journal.state
        # the store the run was created in (by training, or by an earlier sync that was cut short);
        # a run never created goes where --uri says, else to the store training last aimed at
        home = (state.run_uri or state.uri) if state.run_id else None
        if uri and home and uri != home:
            journal.close()
            raise UserError(f"{path}: its MLflow run {state.run_id} lives in {home}; sync it there (leave out --uri), "
                            f"not to {uri}")
        target = home or uri or state.last_uri
        try:
            sent = send_pending(journal, MlflowClient(tracking_uri=target), target)
        finally:
            journal.close()
    return SyncResult(sent, journal.state.run_id, journal.state.experiment_id, target)


def make_tracker(cfg: RunConfig, rank: int, resuming: bool = False) -> Tracker:
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return MLflowTracker(cfg, resuming)

