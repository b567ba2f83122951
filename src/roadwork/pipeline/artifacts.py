"""Reading and writing the stages' artifacts: one function per file a stage leaves in its folder.

Every stage writes into its own folder ``ROOT/NAME/STAGE/`` (see :mod:`roadwork.pipeline.runner`); the stages
after it, the evaluation and the CLI read those files only through these functions, so a file's name and
layout are written down once:

=================  ====================================================================================
stage folder       files
=================  ====================================================================================
``data``           ``dataset.parquet`` (id, path, label, split, sha256, slice columns), ``data_report.json``
``train``          ``model.json`` (the model card), ``model.safetensors``, ``history.json``, ``training.png``
``predict``        ``predictions-{val,calib,test}.parquet`` (:class:`~roadwork.trust.Predictions`)
``calibrate``      ``calibrator.json``, ``split.json`` (row counts), ``checks.json``
``cascade_models`` ``stages.json``, ``predictions-{split}-{stage}.parquet``, ``gate-{split}-{stage}.parquet``
``cascade``        ``cascade.json`` (the certified cascade, or ``{"enabled": false}``), ``curves.json``
``conformal``      ``conformal.json``; ``selective``: ``selective.json``; ``policy``: ``policy.json``
``export``         ``bundle/`` (its ``manifest.json``)
=================  ====================================================================================

Each folder also holds the runner's ``manifest.json`` (:func:`stage_manifest`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork.config import RunConfig
from roadwork.trust import Predictions, TrustPolicy
from roadwork.trust.calibration import Calibrator, calibrator_from_dict
from roadwork.trust.cascade import Cascade, CascadeStage

__all__ = [
    "DATASET_COLUMNS",
    "SPLITS_PREDICTED",
    "abs_paths",
    "decode_side_for",
    "label_indices",
    "load_calibrator",
    "load_cascade",
    "load_dataset",
    "load_policy",
    "load_predictions",
    "read_json",
    "run_decode_side",
    "slice_columns",
    "split_rows",
    "stage_manifest",
    "stage_outputs",
    "write_stage_outputs",
]

SPLITS_PREDICTED = ("val", "calib", "test")
"""The splits the predict stage stores logits for (train is not predicted)."""
DATASET_COLUMNS = ("id", "path", "label", "split", "sha256")
"""The data stage's own columns; every other column of dataset.parquet is a slice (weather, camera, ...)."""


def read_json(path: Path) -> Any:
    """A JSON artifact."""
    return json.loads(Path(path).read_text())


def stage_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The runner's ``manifest.json`` of a stage folder (its key, seconds and info), or None when absent."""
    path = Path(stage_dir) / "manifest.json"
    return read_json(path) if path.is_file() else None


# ------------------------------------------------------------------------------------- data


def load_dataset(data_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """The data stage's table (one row per image) and the class names, in label order."""
    df = pd.read_parquet(Path(data_dir) / "dataset.parquet")
    return df, list(read_json(Path(data_dir) / "data_report.json")["classes"])


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split (train, val, calib, test)."""
    return df[df["split"] == split]


def label_indices(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """The rows' labels as class indices (int64, shape (n,))."""
    index = {c: i for i, c in enumerate(classes)}
    return df["label"].map(index).to_numpy(dtype=np.int64)


def abs_paths(df: pd.DataFrame, data_dir: Path) -> list[str]:
    """The rows' image paths; paths inside the run folder are stored relative to the data stage's folder."""
    return [p if Path(p).is_absolute() else str(Path(data_dir) / p) for p in df["path"]]


def slice_columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The rows' slice columns (every column that is not one of :data:`DATASET_COLUMNS`)."""
    return {c: df[c].to_numpy() for c in df.columns if c not in DATASET_COLUMNS}


def decode_side_for(cfg: RunConfig, spec: Any) -> int:
    """The side every image of this run is decoded to (JPEG DCT scaling, see data.preprocess): the largest
    resize side of the model and, with a cascade, of the small net and the features. The predict stage, the
    cascade's stages, export and the bundle all decode with it, so the logits certified are the logits served."""
    from roadwork.data.features import FEATURE_SPEC
    from roadwork.data.preprocess import PreprocessSpec, decode_side

    specs = [spec]
    c = cfg.cascade
    if c.enabled:
        if c.small is not None:
            specs.append(PreprocessSpec(size=c.small.image_size))
        if c.boosting != "none":
            specs.append(FEATURE_SPEC)
    return decode_side(*specs)


def run_decode_side(cfg: RunConfig, train_dir: Path) -> int:
    """The run's decode side (:func:`decode_side_for`) from the train stage's model card."""
    from roadwork.models.factory import ModelCard

    return decode_side_for(cfg, ModelCard.load(Path(train_dir) / "model.json").preprocess)


# ------------------------------------------------------------------------------------- trust stages


def load_predictions(predict_dir: Path, split: str) -> Predictions:
    """The predict stage's logits (with ids, labels and slices) on one split."""
    return Predictions.from_parquet(Path(predict_dir) / f"predictions-{split}.parquet")


def load_calibrator(calibrate_dir: Path) -> Calibrator:
    """The calibrate stage's calibrator."""
    return calibrator_from_dict(read_json(Path(calibrate_dir) / "calibrator.json"))


def load_cascade(cascade_dir: Path) -> Cascade | None:
    """The cascade stage's certified cascade (None when the cascade is off)."""
    spec = read_json(Path(cascade_dir) / "cascade.json")
    return Cascade.from_dict(spec) if spec.get("enabled") else None


def load_policy(run_dir: Path) -> TrustPolicy:
    """The policy stage's trust policy of a run folder."""
    return TrustPolicy.load(Path(run_dir) / "policy" / "policy.json")


# ------------------------------------------------------------------------------------- cascade_models


def stage_outputs(cascade_dir: Path, stage: CascadeStage, split: str) -> np.ndarray:
    """A cascade stage's stored outputs on a split as its model emits them: class logits (n, K), plus the
    gate logit as a last column (n, K+1) for a learned gate."""
    z = Predictions.from_parquet(Path(cascade_dir) / f"predictions-{split}-{stage.name}.parquet").logits
    if stage.info.get("gate"):
        g = pd.read_parquet(Path(cascade_dir) / f"gate-{split}-{stage.name}.parquet")["gate_logit"].to_numpy()
        z = np.concatenate([z, g[:, None]], axis=1)
    return z


def write_stage_outputs(
    cascade_dir: Path, name: str, split: str, p: Predictions, logits: np.ndarray, gate: np.ndarray | None
) -> None:
    """Store an earlier cascade stage's outputs on a split (read back by :func:`stage_outputs`): its class
    logits on the rows of ``p`` and, for a learned gate, the gate logit."""
    Predictions(p.ids, p.labels, logits, p.classes, p.slices).to_parquet(
        Path(cascade_dir) / f"predictions-{split}-{name}.parquet"
    )
    if gate is not None:
        pd.DataFrame({"id": p.ids, "gate_logit": gate}).to_parquet(
            Path(cascade_dir) / f"gate-{split}-{name}.parquet", index=False
        )
