"""The label audit of a run (:mod:`roadwork.field.audit` on its stages' outputs): the inputs from the data,
predict and calibrate stages, and ``roadwork audit RUN``, which writes ``RUN/audit`` and the report's section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork.errors import InputError
from roadwork.field.audit import write_audit

__all__ = ["audit_inputs", "audit_run", "run_audit_inputs"]


def run_audit_inputs(run: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str], dict[str, Any]]:
    """:func:`audit_inputs` of a run folder whose data, predict and calibrate stages are complete."""
    for stage in ("data", "predict", "calibrate"):
        if not (run / stage / "manifest.json").is_file():
            raise InputError(
                f"{str(run)!r} has no complete {stage} stage; run 'roadwork run ... name={run.name} --until "
                "calibrate' first (or pass a run folder, runs/NAME)."
            )
    return audit_inputs(run / "data", run / "predict", run / "calibrate")


def audit_inputs(
    data_dir: Path, predict_dir: Path, calibrate_dir: Path
) -> tuple[np.ndarray, np.ndarray, list[str], list[str], dict[str, Any]]:
    """The out-of-sample probabilities (calibration and test splits through the model and the calibrator), their
    labels, ids, the classes, and each id's image path, from the stages' folders."""
    from roadwork.pipeline.artifacts import abs_paths, load_calibrator, load_dataset, load_predictions

    calibrator = load_calibrator(calibrate_dir)
    parts = [load_predictions(predict_dir, split) for split in ("calib", "test")]
    column = getattr(calibrator, "column", None)
    probs = np.concatenate(
        [
            calibrator.predict_proba(pr.logits, pr.slices.get(column))  # type: ignore[call-arg]
            if column
            else calibrator.predict_proba(pr.logits)
            for pr in parts
        ]
    )
    labels = np.concatenate([pr.labels for pr in parts])
    ids = [str(i) for pr in parts for i in pr.ids]
    df, _ = load_dataset(data_dir)
    path_of = dict(zip(df["id"].astype(str), abs_paths(df, data_dir), strict=True))
    return probs, labels, ids, list(parts[0].classes), path_of


def audit_run(run: str | Path, *, top: int = 12) -> dict[str, Any]:
    """``roadwork audit RUN``: :func:`write_audit` into ``RUN/audit`` (``label_issues.csv``, ``audit.json``), and
    the "Label audit" section with the ``top`` suspects' thumbnails into the run's ``evaluate/report.html`` when it
    has one (the pipeline's evaluate stage writes the same section when ``evaluate.label_audit`` is on). Returns
    the audit (``issues`` with their paths)."""
    from roadwork.evaluation.report import refresh_outputs, with_section

    run = Path(run)
    if int(top) < 0:
        raise InputError(f"top={top} is negative; pass top=0 (no thumbnails) or more.")
    result, section = write_audit(run / "audit", *run_audit_inputs(run), top=top)
    report = run / "evaluate" / "report.html"
    if report.is_file() and (run / "evaluate" / "manifest.json").is_file():
        refresh_outputs(
            run / "evaluate", {"report.html": with_section(report.read_text(), "label-audit", section)}
        )
        result["report"] = str(report)
    return result
