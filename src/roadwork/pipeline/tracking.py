"""MLflow tracking into a local SQLite store under the runs folder (any tracking URI works)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.config import RunConfig

__all__ = ["Tracker", "flatten"]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Tracker:
    """One MLflow run per pipeline invocation: params, per-epoch metrics, final metrics, artifacts."""

    def __init__(self, cfg: RunConfig) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.mlflow = require("mlflow")
        for name in ("mlflow", "alembic", "sqlalchemy"):  # after the import: mlflow configures its logger
            logging.getLogger(name).setLevel(logging.ERROR)
        root = Path(cfg.root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.uri = cfg.tracking.uri or f"sqlite:///{root / 'mlflow.db'}"
        self.mlflow.set_tracking_uri(self.uri)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = self.mlflow.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                exp_id = self.mlflow.create_experiment(
                    cfg.tracking.experiment, artifact_location=(root / "mlartifacts").as_uri()
                )
            else:
                exp_id = exp.experiment_id
            self.run = self.mlflow.start_run(experiment_id=exp_id, run_name=cfg.name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg.model_dump(mode="json")).items()})
        self.wandb: Any = None
        if cfg.tracking.wandb:  # alongside MLflow, never instead of it
            self.wandb = require("wandb")
            self.wandb_run = self.wandb.init(
                project=cfg.tracking.experiment,
                name=cfg.name,
                config=cfg.model_dump(mode="json"),
                dir=str(root),
                reinit="finish_previous",
            )

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        clean = {
            k.replace("=", "_"): float(v)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        }
        self.mlflow.log_metrics(clean, step=step)
        if self.wandb is not None:
            self.wandb_run.log(clean, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=folder)
        elif path.is_file():
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
        if self.wandb is not None:
            self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)
