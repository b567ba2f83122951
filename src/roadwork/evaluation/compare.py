"""``roadwork compare``: every gradient-boosting framework on the same cheap image features and the same
splits, side by side — accuracy, ECE before/after temperature scaling, conformal set size, fit time and
predict µs/row (the framework's own predict, and roadwork's numpy tree table that the bundle serves)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from roadwork.models.boosting import (
    FRAMEWORKS,
    BoostingParams,
    available_frameworks,
    fit_booster,
    native_raw,
    to_trees,
)
from roadwork.models.trees import margins_to_logits
from roadwork.trust import metrics as M
from roadwork.trust import softmax
from roadwork.trust.calibration import TemperatureScaler
from roadwork.trust.conformal import SplitConformal

__all__ = ["compare_frameworks", "format_compare"]

_INSTALL = {"sklearn": "scikit-learn", "xgboost": "xgboost", "lightgbm": "lightgbm", "catboost": "catboost"}


def _per_row_us(fn: Any, x: np.ndarray, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return float(best * 1e6 / max(len(x), 1))


def compare_frameworks(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    n_classes: int,
    *,
    alpha: float = 0.1,
    params: BoostingParams | None = None,
    frameworks: Sequence[str] = FRAMEWORKS,
) -> list[dict[str, Any]]:
    """``features``/``labels`` by split (``train``, ``calib``, ``test``). One row per framework; a framework
    that is not installed gets ``status: skipped`` and how to install it."""
    params = params or BoostingParams()
    have = available_frameworks()
    rows: list[dict[str, Any]] = []
    for fw in frameworks:
        if not have.get(fw, False):
            rows.append({"framework": fw, "status": f"skipped: not installed (pip install {_INSTALL[fw]})"})
            continue
        t0 = time.perf_counter()
        model = fit_booster(fw, features["train"], labels["train"], n_classes, params)
        fit_s = time.perf_counter() - t0
        z_cal = margins_to_logits(native_raw(fw, model, features["calib"]))
        z_test = margins_to_logits(native_raw(fw, model, features["test"]))
        temp = TemperatureScaler().fit(z_cal, labels["calib"])
        p_cal, p_test = temp.predict_proba(z_cal), temp.predict_proba(z_test)
        sets = SplitConformal(alpha=alpha).fit(p_cal, labels["calib"]).predict_sets(p_test)
        y = labels["test"]
        trees = to_trees(fw, model, features["calib"][:256])
        rows.append(
            {
                "framework": fw,
                "status": "ok",
                "accuracy": M.accuracy(p_test, y),
                "ece_before": M.ece(softmax(z_test), y),
                "ece_after": M.ece(p_test, y),
                "coverage": float(sets[np.arange(len(y)), y].mean()),
                "mean_set_size": float(sets.sum(axis=1).mean()),
                "fit_s": fit_s,
                "predict_us_native": _per_row_us(
                    lambda x, fw=fw, model=model: native_raw(fw, model, x), features["test"]
                ),
                "predict_us_roadwork": _per_row_us(trees.raw, features["test"]),
                "trees": len(trees.roots),
            }
        )
    return rows


def format_compare(rows: list[dict[str, Any]], *, alpha: float) -> Any:
    """The rows of :func:`compare_frameworks` as a rich table (what ``roadwork compare`` prints)."""
    from rich.table import Table

    t = Table(title=f"gradient boosting on the same features and splits (conformal α={alpha:g})")
    for col in (
        "framework",
        "accuracy",
        "ECE raw → temp.",
        "coverage / set size",
        "fit s",
        "µs/row native",
        "µs/row roadwork",
    ):
        t.add_column(col, justify="left" if col == "framework" else "right")
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["framework"], r["status"], "", "", "", "", "")
            continue
        t.add_row(
            r["framework"],
            f"{r['accuracy']:.4f}",
            f"{r['ece_before']:.4f} → {r['ece_after']:.4f}",
            f"{r['coverage']:.3f} / {r['mean_set_size']:.3f}",
            f"{r['fit_s']:.2f}",
            f"{r['predict_us_native']:.2f}",
            f"{r['predict_us_roadwork']:.2f}",
        )
    return t
