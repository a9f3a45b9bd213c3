"""Tracking behind a small interface: MLflow on global rank 0, a no-op everywhere else.

One MLflow run per training run (never one per rank). The store is `tracking.uri` from the recipe,
else MLFLOW_TRACKING_URI (resolved at the CLI edge), else a sqlite file in the run directory.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from sabiscale.config import RunConfig, config_to_dict

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


def set_tracking_uri_quietly(mlflow, uri: str) -> None:
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI into this process's environment
    "so that subprocesses inherit it": a run started in-process (a notebook, a test) would then
    send every later sabiscale command's metrics to this run's store. Keep the environment as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it holds
# model training; this tag gives the classic runs, metrics and charts view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(mlflow, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created (with the training view, artifacts where asked) if new."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    else:
        experiment_id = experiment.experiment_id
        if "mlflow.experimentKind" not in experiment.tags:
            mlflow.MlflowClient().set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def run_page(ui: str, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI page of one run (its metrics, parameters, artifacts and plots)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MLflowTracker:
    def __init__(self, cfg: RunConfig) -> None:
        import mlflow  # only rank 0 pays the import

        self._mlflow = mlflow
        self.uri = cfg.tracking.uri or default_tracking_uri(cfg.output_dir)
        set_tracking_uri_quietly(mlflow, self.uri)
        # the default local store keeps its artifacts in the run directory too, not in ./mlruns of
        # whatever directory the command ran in
        local = cfg.tracking.uri is None
        ensure_experiment(mlflow, cfg.tracking.experiment or cfg.name,
                          (cfg.output_dir / "mlruns").resolve().as_uri() if local else None)
        if cfg.tracking.run_id:  # a continued run keeps its parameters; metrics go on from its last step
            self._run = mlflow.start_run(run_id=cfg.tracking.run_id, log_system_metrics=cfg.tracking.system_metrics)
        else:
            self._run = mlflow.start_run(run_name=default_run_name(cfg), log_system_metrics=cfg.tracking.system_metrics)
        self.run_id = self._run.info.run_id
        self.experiment_id = self._run.info.experiment_id
        if not cfg.tracking.run_id:
            self._log_config(cfg)
            self._log_inputs(cfg)

    def _log_config(self, cfg: RunConfig) -> None:
        params = flatten(config_to_dict(cfg))
        long = {k: v for k, v in params.items() if len(v) > MAX_PARAM_LENGTH}
        self._mlflow.log_params({k: v for k, v in params.items() if k not in long})
        if long:
            self._mlflow.log_dict(long, "long_params.json")
        self._mlflow.log_dict(config_to_dict(cfg), "config/resolved_config.json")

    def _log_inputs(self, cfg: RunConfig) -> None:
        """The recipe as written and the tokenizer, so the run can be reproduced from its page."""
        if cfg.recipe is not None and Path(cfg.recipe).is_file():
            self._mlflow.log_artifact(str(cfg.recipe), artifact_path="config")
        if cfg.tokenizer_path.is_file():
            self._mlflow.log_artifacts(str(cfg.tokenizer_path.parent), artifact_path="tokenizer")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_json(self, data: dict, name: str) -> None:
        self._mlflow.log_dict(data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_checkpoint(self, path: Path, upload: bool) -> None:
        self._mlflow.set_tag("checkpoint", str(path.resolve()))
        if upload:
            self._mlflow.log_artifacts(str(path), artifact_path=f"checkpoints/{path.name}")

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


class ResilientTracker:
    """MLflow that never stops training: when the store is unreachable it warns once, keeps the
    metrics, retries every `retry_seconds`, sends them when it is back, and at the end writes what
    could not be sent to `<output_dir>/tracking_fallback.jsonl`."""

    def __init__(self, cfg: RunConfig, retry_seconds: float = 30.0) -> None:
        self.fallback_path = cfg.output_dir / "tracking_fallback.jsonl"
        self.retry_seconds = retry_seconds
        self._pending: list[tuple[dict[str, float], int]] = []
        self._down_since: float | None = None
        self._next_try = 0.0
        try:
            self.inner: MLflowTracker | None = MLflowTracker(cfg)
        except Exception as err:  # noqa: BLE001 - any failure of the store must not stop training
            self.inner = None
            self._unreachable(err, cfg.tracking.uri or default_tracking_uri(cfg.output_dir))
        self.run_id = self.inner.run_id if self.inner else None
        self.uri = self.inner.uri if self.inner else None
        self.experiment_id = self.inner.experiment_id if self.inner else None

    def _unreachable(self, err: Exception, where: str | None = None) -> None:
        if self._down_since is None:
            log.warning("tracking store %s unreachable (%s): training continues; metrics are kept and sent "
                        "when it is back, or written to %s", where or self.uri, err, self.fallback_path)
            self._down_since = time.monotonic()
        self._next_try = time.monotonic() + self.retry_seconds

    def _call(self, method: str, *args) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as err:  # noqa: BLE001
            self._unreachable(err)

    def _flush(self, force: bool = False) -> None:
        if self.inner is None or not self._pending or (not force and time.monotonic() < self._next_try):
            return
        try:
            while self._pending:
                self.inner.log_metrics(*self._pending[0])
                self._pending.pop(0)
        except Exception as err:  # noqa: BLE001
            self._unreachable(err)
            return
        if self._down_since is not None:
            log.warning("tracking store reachable again; buffered metrics sent")
            self._down_since = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._pending.append(({k: float(v) for k, v in metrics.items()}, step))
        self._flush()

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._call("log_artifact", path, folder)

    def log_json(self, data: dict, name: str) -> None:
        self._call("log_json", data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags)

    def log_checkpoint(self, path: Path, upload: bool) -> None:
        self._call("log_checkpoint", path, upload)

    def finish(self, status: str = "FINISHED") -> None:
        self._flush(force=True)
        if self._pending:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_path.open("a", encoding="utf-8") as f:
                for metrics, step in self._pending:
                    f.write(json.dumps({"run_id": self.run_id, "step": step, "metrics": metrics}) + "\n")
            log.warning("%d metric records could not reach the tracking store; they are in %s",
                        len(self._pending), self.fallback_path)
        self._call("finish", status)


def make_tracker(cfg: RunConfig, rank: int) -> Tracker:
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return ResilientTracker(cfg)

