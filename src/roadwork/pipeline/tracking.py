"""MLflow tracking into a local SQLite store under the runs folder (any tracking URI works).

What goes where, as MLflow users expect: the resolved configuration — and the settings that metrics.json
echoes (``conformal.alpha``, ``selective.delta``, ``evaluate.ece_bins``) and the split sizes — as params;
measured numbers as metrics (per epoch with a step); the run's files as artifacts: ``evaluate/metrics.json``,
``evaluate/slices.csv``, ``data/data_report.json``, the report, the model card and the bundle. Each invocation
is one run, named after the run and how far it went (``demo``, ``demo · until train``), so the stage
commands of a ``dvc repro`` stay apart in the MLflow UI.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.config import RunConfig

__all__ = ["Tracker", "flatten", "run_name"]

# numbers in metrics.json that are settings or sizes, not measurements: params, not metrics
_SETTINGS_IN_METRICS = {
    "test.ece.bins": "evaluate.ece_bins",
    "test.n": "test.n",
    "conformal.n_calib": "calib.n",
}
# the run's own files, logged as artifacts when the run ends (run-folder path → artifact folder)
_RESULT_FILES = {
    "evaluate/metrics.json": "evaluate",
    "evaluate/slices.csv": "evaluate",
    "data/data_report.json": "data",
}


def run_name(name: str, until: str | None = None) -> str:
    """The MLflow run name of one pipeline invocation: ``demo``, or ``demo · until train``."""
    return name if until is None else f"{name} · until {until}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
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

    def __init__(self, cfg: RunConfig, *, until: str | None = None) -> None:
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
            self.run = self.mlflow.start_run(
                experiment_id=exp_id,
                run_name=run_name(cfg.name, until),
                tags={"roadwork.name": cfg.name, "roadwork.until": until or "all"},
            )
        self.run_dir = cfg.run_dir
        self.params = flatten(cfg.model_dump(mode="json"))
        self.mlflow.log_params({k: str(v)[:500] for k, v in self.params.items()})
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
        """Numbers as metrics; a config setting echoed in ``metrics`` is a param already and is skipped, and the
        sizes and settings of :data:`_SETTINGS_IN_METRICS` become params."""
        numbers = {
            k.replace("=", "_"): v
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
        }
        params = {
            _SETTINGS_IN_METRICS[k]: v
            for k, v in numbers.items()
            if k in _SETTINGS_IN_METRICS and _SETTINGS_IN_METRICS[k] not in self.params
        }
        if params:
            self.mlflow.log_params({k: str(v) for k, v in params.items()})
            self.params.update(params)
        clean = {
            k: float(v) for k, v in numbers.items() if k not in self.params and k not in _SETTINGS_IN_METRICS
        }
        self.mlflow.log_metrics(clean, step=step)
        if self.wandb is not None:
            self.wandb_run.log(clean, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the run (e.g. which stages ran and which were cached)."""
        self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Log a file, or a folder's files, as artifacts of the run (under ``folder``)."""
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=folder)
        elif path.is_file():
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        """End the run; a finished one first gets the run folder's result files (those that exist) as artifacts."""
        if status == "FINISHED":
            for rel, folder in _RESULT_FILES.items():
                self.log_artifact(self.run_dir / rel, folder)
        self.mlflow.end_run(status=status)
        if self.wandb is not None:
            self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)
