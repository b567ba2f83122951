"""Is the served traffic still the traffic the policy was certified on? (numpy + pandas; no torch).

Every guarantee roadwork gives (coverage, certified abstention, the cascade bound) assumes new images are
exchangeable with the calibration split. This module compares a table of predictions (what the server logs
with ``log_dir=``, or what ``roadwork predict`` writes) with a reference (the calibration split through the
policy, stored in the bundle as ``reference.json``, or another prediction log):

- **PSI** (population stability index) and the two-sample **Kolmogorov–Smirnov** test on the top-class
  confidence: PSI = Σ (c_i − r_i) ln(c_i / r_i) over the reference's confidence deciles; above 0.25 is the
  usual "major shift" (0.1–0.25 moderate);
- **class mix**: total variation distance between predicted-label shares;
- **abstention rate** and **mean set size** changes;
- the same per slice (``weather=fog`` …) where both sides have enough rows.

PSI has a small-sample floor: with n and m rows in 10 bins its expectation without any shift is about
9·(1/n + 1/m); :func:`compare_predictions` reports it so a reader can tell noise from drift.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork.errors import InputError

__all__ = ["DriftThresholds", "compare_predictions", "load_predictions", "psi", "reference_table"]

_EPS = 1e-4
COLUMNS = ("label", "probability", "set_size", "abstain")


@dataclass(frozen=True)
class DriftThresholds:
    """When a served sample counts as drifted from the reference: confidence PSI, class-mix distance, and the
    abstention-rate change."""

    psi: float = 0.25  # confidence PSI above this: drift
    class_mix: float = 0.15  # total variation distance of predicted-label shares above this: drift
    abstain: float = 0.15  # absolute change of the abstention rate above this: drift
    min_rows: int = 50  # a slice needs this many rows on both sides to be compared


def _edges(reference: np.ndarray, bins: int) -> np.ndarray:
    qs = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def _shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``, on the reference's quantile bins."""
    reference, current = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    if not len(reference) or not len(current):
        raise InputError("psi needs at least one reference and one current value.")
    edges = _edges(reference, bins)
    r = np.clip(_shares(reference, edges), _EPS, None)
    c = np.clip(_shares(current, edges), _EPS, None)
    return float(((c - r) * np.log(c / r)).sum())


def _block(ref: pd.DataFrame, cur: pd.DataFrame, th: DriftThresholds) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    labels = sorted(set(ref["label"]) | set(cur["label"]), key=str)
    r_mix = ref["label"].value_counts(normalize=True).reindex(labels, fill_value=0.0)
    c_mix = cur["label"].value_counts(normalize=True).reindex(labels, fill_value=0.0)
    p = psi(ref["probability"].to_numpy(), cur["probability"].to_numpy())
    ks = ks_2samp(ref["probability"].to_numpy(), cur["probability"].to_numpy())
    tv = float(0.5 * np.abs(r_mix.to_numpy() - c_mix.to_numpy()).sum())
    d_abstain = float(cur["abstain"].mean() - ref["abstain"].mean())
    out = {
        "n_reference": len(ref),
        "n_current": len(cur),
        "psi_confidence": p,
        "psi_noise_floor": 9 * (1 / len(ref) + 1 / len(cur)),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "mean_confidence": [float(ref["probability"].mean()), float(cur["probability"].mean())],
        "class_mix": {str(k): [float(r_mix[k]), float(c_mix[k])] for k in labels},
        "class_mix_tv": tv,
        "abstain_rate": [float(ref["abstain"].mean()), float(cur["abstain"].mean())],
        "mean_set_size": [float(ref["set_size"].mean()), float(cur["set_size"].mean())],
    }
    reasons = []
    if p > th.psi:
        reasons.append(f"confidence PSI {p:.3f} > {th.psi}")
    if tv > th.class_mix:
        reasons.append(f"class mix moved by {tv:.3f} > {th.class_mix}")
    if abs(d_abstain) > th.abstain:
        reasons.append(f"abstention rate changed by {d_abstain:+.3f}")
    out["drift"] = bool(reasons)
    out["reasons"] = reasons
    return out


def compare_predictions(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    thresholds: DriftThresholds | None = None,
    slice_columns: list[str] | None = None,
) -> dict[str, Any]:
    """Both tables have ``label``, ``probability`` (top-class confidence), ``set_size``, ``abstain``, and any
    slice columns. Returns the overall comparison, one per slice value with enough rows on both sides, and
    ``drift``: whether anything crossed its threshold."""
    th = thresholds or DriftThresholds()
    for name, t in (("reference", reference), ("current", current)):
        missing = [c for c in COLUMNS if c not in t.columns]
        if missing:
            raise InputError(f"the {name} predictions lack columns {missing}; they need {list(COLUMNS)}.")
        if len(t) < 2:
            raise InputError(f"the {name} predictions have {len(t)} rows; drift needs at least 2.")
    overall = _block(reference, current, th)
    cols = slice_columns
    if cols is None:
        cols = [
            c
            for c in reference.columns
            if c in current.columns and c not in (*COLUMNS, "stage", "score", "ts")
        ]
    slices: dict[str, Any] = {}
    for col in cols:
        r_col, c_col = reference[col].astype(str), current[col].astype(str)
        for v in sorted(set(r_col) & set(c_col)):
            r, c = reference[r_col == v], current[c_col == v]
            if len(r) >= th.min_rows and len(c) >= th.min_rows:
                slices[f"{col}={v}"] = _block(r, c, th)
    return {
        "thresholds": asdict(th),
        "overall": overall,
        "slices": slices,
        "drift": overall["drift"] or any(s["drift"] for s in slices.values()),
    }


def reference_table(
    probs: np.ndarray, sets: np.ndarray, abstain: np.ndarray, classes: list[str], slices: dict[str, Any]
) -> pd.DataFrame:
    """The reference as a prediction table (the calibration split through the policy)."""
    df = pd.DataFrame(
        {
            "label": [classes[k] for k in probs.argmax(axis=1)],
            "probability": probs.max(axis=1),
            "set_size": sets.sum(axis=1),
            "abstain": abstain.astype(bool),
        }
    )
    for k, v in slices.items():
        df[k] = np.asarray(v).astype(str)
    return df


def load_predictions(path: str | Path) -> pd.DataFrame:
    """A prediction table from a Parquet/JSON-lines file, a folder of Parquet logs, a bundle (its
    ``reference.json``) or a run folder (its bundle)."""
    p = Path(path)
    if not p.exists():
        raise InputError(
            f"{str(p)!r} does not exist; pass a bundle or run folder, the server's log_dir, or a Parquet/JSON-lines "
            "prediction file."
        )
    if (p / "export" / "bundle").is_dir():
        p = p / "export" / "bundle"
    if (p / "reference.json").is_file():
        return pd.DataFrame(json.loads((p / "reference.json").read_text())["rows"])
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise InputError(
                f"{str(p)!r} holds no prediction logs (*.parquet) and is not a bundle or run folder; pass the "
                "server's log_dir, a bundle, or a run folder."
            )
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    if p.suffix in (".jsonl", ".json"):
        df = pd.read_json(p, lines=True)
        if "prediction_set" in df.columns and "set_size" not in df.columns:
            df["set_size"] = df["prediction_set"].map(len)
        return df
    raise InputError(f"{str(p)!r} is not a prediction log (Parquet, JSON lines), a bundle or a run folder.")
