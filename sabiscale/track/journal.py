"""The tracking journal: everything a run logs to MLflow is first appended to
`<output_dir>/tracking_journal.jsonl`, then delivered to the store.

Why a journal and not only an in-memory buffer: the store may be down when the run starts (then
the MLflow run does not exist yet), go away mid-run, or stay down until the run has ended. The
journal lets the run be created as soon as the store answers, with its parameters, artifacts and
every metric at its own step and time; lets `sabiscale tracking sync RUN_DIR` deliver what never
got through, later and as often as wanted (what was sent is recorded, so nothing is sent twice);
and lets a resumed run skip the metric steps it replays from its checkpoint, which the store
already holds.

Lines are records (`op`: start, params, json, artifact, tags, metrics, status) and bookkeeping
(`run`: the run id once created and the store it was created in; `sent`: how many records have
reached the store). A kill -9 can tear only the last line, which is ignored. Records that reached
the store are not kept in memory; from time to time, when nothing is pending, the state is saved
beside the journal (`.state`: counts, run, last steps, byte offset), so a resumed run reads only
the lines after it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sabiscale.errors import UserError

log = logging.getLogger("sabiscale.tracking")

JOURNAL_NAME = "tracking_journal.jsonl"
JOURNAL_TAG = "sabiscale.journal"  # the run's tag naming the journal that created it
# MLflow's limits per log_batch call
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class JournalState:
    """What the journal says, without holding what was already delivered: only the records not yet
    sent stay in memory (`pending`, the records numbered `sent` .. `count`-1)."""

    pending: list[dict] = field(default_factory=list)
    count: int = 0                                       # records in the journal
    sent: int = 0                                        # records [0, sent) reached the store
    run_id: str | None = None
    experiment_id: str | None = None
    run_uri: str | None = None                           # the store the run was created in
    uri: str | None = None                               # the store of the first start record
    last_uri: str | None = None                          # the store of the latest start record
    last_step: dict[str, int] = field(default_factory=dict)  # metric key -> highest step recorded
    first_config: dict | None = None                     # the run's resolved config, as first logged
    last_status: str | None = None

    def note(self, record: dict) -> None:
        op = record["op"]
        if op == "metrics":
            for key in record["metrics"]:
                self.last_step[key] = max(self.last_step.get(key, -1), record["step"])
        elif op == "start":
            self.uri = self.uri or record["uri"]
            self.last_uri = record["uri"]
        elif op == "json" and record["name"] == "config/resolved_config.json" and self.first_config is None:
            self.first_config = record["data"]
        elif op == "status":
            self.last_status = record["status"]

    def snapshot(self) -> dict:
        """Everything but the pending records (taken only when none are pending)."""
        return {k: v for k, v in self.__dict__.items() if k != "pending"}


def snapshot_path(path: Path) -> Path:
    """Where the journal's state is saved from time to time, so a resume reads only what follows."""
    return path.with_name(path.name + ".state")


def read_journal(path: Path) -> JournalState:
    """The journal's state: from its last saved snapshot, reading only the lines after it (a long
    run's journal holds ~2 lines per step), or from the start when there is no usable snapshot."""
    state, offset = _load_snapshot(path)
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    recent: list[dict] = []  # records since the snapshot, numbered from state.count
    first = state.count
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines):  # torn by a kill in the middle of a write: never sent, never complete
                break
            raise UserError(f"{path}: line {number} after byte {offset} is not a journal line (JSON expected). The file "
                            "is written by sabiscale train; if it was edited, restore it or move it aside (its "
                            "records are then not synced)") from None
        if entry["op"] == "sent":
            state.sent = entry["upto"]
        elif entry["op"] == "run":
            state.run_id, state.experiment_id = entry["run_id"], entry["experiment_id"]
            state.run_uri = entry.get("uri")
        else:
            recent.append(entry)
            state.count += 1
            state.note(entry)
    state.pending = recent[max(state.sent - first, 0):]
    return state


def _load_snapshot(path: Path) -> tuple[JournalState, int]:
    """(state, byte offset it accounts up to); a fresh state and 0 when there is none, or when it
    belongs to another journal (moved aside) or to a longer one (the journal was cut)."""
    saved = snapshot_path(path)
    if not saved.is_file():
        return JournalState(), 0
    try:
        snap = json.loads(saved.read_text(encoding="utf-8"))
        with path.open("rb") as f:
            head = f.readline()
        if snap.pop("head") != head.decode("utf-8", "replace") or snap["offset"] > path.stat().st_size:
            return JournalState(), 0
        offset = snap.pop("offset")
        return JournalState(**snap), offset
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        return JournalState(), 0  # a damaged snapshot costs only time: the journal itself is read


def drop_torn_tail(path: Path) -> None:
    """A line a kill cut short would sit in the middle once more lines follow: cut it off first."""
    with path.open("rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = max(size - (1 << 20), 0)  # a record line is far shorter than 1 MiB
        f.seek(start)
        tail = f.read()
        cut = tail.rfind(b"\n")
        f.truncate(start + cut + 1 if cut >= 0 else 0 if start == 0 else size)


def recorded_run_id(output_dir: Path) -> str | None:
    path = Path(output_dir) / JOURNAL_NAME
    return read_journal(path).run_id if path.is_file() else None


class Journal:
    # a snapshot at most every this many records once all are sent: a resume then reads at most this many lines
    SNAPSHOT_EVERY = 2000

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = JournalState()
        if path.is_file():
            drop_torn_tail(path)
            self.state = read_journal(path)
        self._file = None
        self._since_snapshot = 0
        self._head: str | None = None
        # training appends while the tracker's sender thread marks records sent: a snapshot must
        # never fall between a record's write and its note in the state
        self._lock = threading.RLock()

    def _write(self, entry: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()  # a kill -9 loses at most the line being written

    def add(self, record: dict) -> None:
        with self._lock:
            self.state.pending.append(record)
            self.state.count += 1
            self.state.note(record)
            self._write(record)
            self._since_snapshot += 1

    def pending(self) -> int:
        return self.state.count - self.state.sent

    def mark_sent(self, upto: int) -> None:
        """Records [0, upto) reached the store: they leave memory; the journal keeps them."""
        with self._lock:
            del self.state.pending[:upto - self.state.sent]
            self.state.sent = upto
            self._write({"op": "sent", "upto": upto})
            if self._since_snapshot >= self.SNAPSHOT_EVERY and not self.pending():
                self.save_snapshot()

    def set_run(self, run_id: str, experiment_id: str, uri: str) -> None:
        with self._lock:
            self.state.run_id, self.state.experiment_id, self.state.run_uri = run_id, experiment_id, uri
            self._write({"op": "run", "run_id": run_id, "experiment_id": experiment_id, "uri": uri})

    def save_snapshot(self) -> None:
        """The state up to the journal's current end, for a resume to start reading there. Only
        with nothing pending: every record before the offset is then delivered and never needed
        in memory again. Written whole or not at all (a kill leaves the previous one)."""
        with self._lock:
            self._save_snapshot()

    def _save_snapshot(self) -> None:
        if self._file is None or self.pending():
            return
        self._file.flush()
        if self._head is None:  # the first line names the journal (its start record's id): it never changes
            with self.path.open("rb") as f:
                self._head = f.readline().decode("utf-8", "replace")
        head = self._head
        saved = snapshot_path(self.path)
        partial = saved.with_name(saved.name + ".partial")
        partial.write_text(json.dumps({**self.state.snapshot(), "offset": self._file.tell(), "head": head}),
                           encoding="utf-8")
        os.replace(partial, saved)
        self._since_snapshot = 0

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._save_snapshot()
                self._file.close()
                self._file = None


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it holds
# model training; this tag gives the classic runs, metrics and charts view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created (with the training view, artifacts where asked) if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def send_pending(journal: Journal, client, uri: str) -> int:
    """Deliver every record not yet sent to the store at `uri` (the client's), in order;
    consecutive metric records go in one call. Raises whatever the store raises; what was
    delivered before stays marked as sent."""
    records = journal.state.pending
    total = len(records)
    while records:
        end = 1
        if records[0]["op"] == "metrics":
            end = metrics_run_end(records, 0)
            send_metrics(client, journal.state.run_id, records[:end])
        else:
            send_record(journal, client, records[0], uri)
        journal.mark_sent(journal.state.sent + end)  # drops them from `records`
    return total


def metrics_run_end(records: list[dict], i: int) -> int:
    count, end = 0, i
    while end < len(records) and records[end]["op"] == "metrics":
        count += len(records[end]["metrics"])
        if count > MAX_METRICS_PER_BATCH and end > i:
            break
        end += 1
    return end


def send_metrics(client, run_id: str, records: list[dict]) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(key, float(value), r["time_ms"], r["step"])
                                      for r in records for key, value in r["metrics"].items()])


def send_record(journal: Journal, client, record: dict, uri: str) -> None:
    from mlflow.entities import Param, RunTag

    op, run_id = record["op"], journal.state.run_id
    if op == "start":
        open_run(journal, client, record, uri)
    elif op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for at in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[at:at + MAX_PARAMS_PER_BATCH])
    elif op == "json":
        client.log_dict(run_id, record["data"], record["name"])
    elif op == "artifact":
        send_artifact(client, run_id, Path(record["path"]), record.get("folder"))
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "status":
        client.set_terminated(run_id, record["status"], end_time=record["time_ms"])
    else:
        raise UserError(f"{journal.path}: unknown journal record {op!r}; was it written by a newer sabiscale?")


def open_run(journal: Journal, client, record: dict, uri: str) -> None:
    """The start of a training process: the run is created the first time (or continued by the id
    the recipe or checkpoint gave), and set RUNNING again when a later process resumes it."""
    run_id = journal.state.run_id or record.get("run_id")
    if run_id is None:
        experiment_id = ensure_experiment(client, record["experiment"], record.get("artifact_location"))
        # a kill between creating the run and journaling its id must not create a second run on retry
        tag = f"tags.`{JOURNAL_TAG}` = '{record['journal_id']}'"
        found = client.search_runs([experiment_id], filter_string=tag, max_results=1)
        run = found[0] if found else client.create_run(experiment_id, start_time=record["time_ms"],
                                                       run_name=record["run_name"],
                                                       tags={JOURNAL_TAG: record["journal_id"]})
        journal.set_run(run.info.run_id, experiment_id, uri)
        return
    client.update_run(run_id, status="RUNNING")
    if journal.state.run_id is None:
        journal.set_run(run_id, client.get_run(run_id).info.experiment_id, uri)


def send_artifact(client, run_id: str, path: Path, folder: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), folder)
    elif path.is_file():
        client.log_artifact(run_id, str(path), folder)
    else:  # removed since the run logged it (e.g. a plot directory cleaned): nothing to send
        log.warning("%s is gone: not logged to MLflow run %s", path, run_id)
