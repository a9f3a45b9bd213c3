"""`sabiscale export --register NAME`: the exported directory goes into the MLflow run that
trained the checkpoint, and becomes a version of a registered model in the MLflow Model
Registry, tagged with the checkpoint's step and the scores `sabiscale eval` recorded for it, so
the lab's MLflow UI shows which checkpoint became which model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sabiscale.config import RunConfig
from sabiscale.errors import UserError
from sabiscale.track.journal import recorded_run_id
from sabiscale.track.tracking import default_tracking_uri


@dataclass
class Registered:
    name: str
    version: str
    run_id: str
    uri: str


def eval_tags(tag_dir: Path) -> dict[str, str]:
    """`eval.<split>.<task/lang>.<score>` for every score of every eval report in the checkpoint."""
    tags = {}
    for report_path in sorted(tag_dir.glob("eval_*.json")):
        report = json.loads(report_path.read_text(encoding="utf-8"))
        for section in ("teacher_forced", "generation", "classification"):
            for key, scores in report.get(section, {}).items():
                for name, value in scores.items():
                    if isinstance(value, float):
                        tags[f"eval.{report['split']}.{key}.{name}"] = f"{value:.4f}"
    return tags


def register_export(out_dir: Path, name: str, cfg: RunConfig, meta: dict, tag_dir: Path) -> Registered:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = meta.get("mlflow_run_id") or recorded_run_id(cfg.output_dir)
    if not run_id:
        raise UserError(f"{tag_dir} knows no MLflow run (trained with tracking.enabled=false, or its store was never "
                        f"reached: `sabiscale tracking sync {cfg.output_dir}` creates it); the export in {out_dir} is "
                        "complete, only the registration was not done")
    uri = cfg.tracking.uri or default_tracking_uri(cfg.output_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    artifact_path = f"model/{tag_dir.name}"
    client.log_artifacts(run_id, str(out_dir), artifact_path)
    try:
        client.create_registered_model(name, description="Pre-trained with sabiscale; each version is one checkpoint.")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"checkpoint": str(tag_dir.resolve()), "checkpoint_step": str(meta["step"]),
            "tokenizer_sha256": meta.get("tokenizer_sha256", ""), "loss_kind": cfg.loss.kind, **eval_tags(tag_dir)}
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                          description=f"{cfg.name}, checkpoint {tag_dir.name}")
    return Registered(name, str(version.version), run_id, uri)
