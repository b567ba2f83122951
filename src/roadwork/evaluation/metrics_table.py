"""Compute ``metrics.json`` from test predictions and the policy: overall, conformal, selective, slices."""

from __future__ import annotations

from typing import Any

import numpy as np

from roadwork.trust import metrics as M
from roadwork.trust import softmax
from roadwork.trust.policy import PolicyOutput, TrustPolicy
from roadwork.trust.predictions import Predictions

__all__ = [
    "METRICS_SCHEMA",
    "calibration_comparison",
    "compute_metrics",
    "conformal_comparison",
    "model_alone_metrics",
    "request_kind_figures",
    "slice_rows",
]

METRICS_SCHEMA = 1
"""The layout version of metrics.json (raised when a key changes meaning)."""


def _decided(out: PolicyOutput, k: int) -> np.ndarray:
    """One-hot rows of the served decision ``out.pred`` (the argmax, or the operating point's): metrics of the
    label clients act on, through the probability-based metric functions."""
    return np.eye(k)[out.pred]


def _group(out: PolicyOutput, labels: np.ndarray, n_bins: int) -> dict[str, float | None]:
    correct = out.pred == labels
    answered = ~out.abstain
    covered = out.sets[np.arange(len(labels)), labels]
    return {
        "n": len(labels),
        "accuracy": float(correct.mean()) if len(labels) else float("nan"),
        "ece": M.ece(out.probs, labels, n_bins),
        "coverage": float(covered.mean()) if len(labels) else float("nan"),
        "mean_set_size": float(out.sets.sum(axis=1).mean()) if len(labels) else float("nan"),
        "abstain_rate": float(out.abstain.mean()) if len(labels) else float("nan"),
        "selective_risk": float(1 - correct[answered].mean()) if answered.any() else None,  # undefined
    }


def slice_rows(preds: Predictions, out: PolicyOutput, n_bins: int) -> dict[str, dict[str, float | None]]:
    """``{"weather=fog": {n, accuracy, ece, coverage, ...}, ...}`` for every slice column and value."""
    rows: dict[str, dict[str, float | None]] = {}
    for col, values in sorted(preds.slices.items()):
        levels = sorted(set(values.tolist()))
        if len(levels) < 2:  # a slice that covers every image says nothing the overall row does not
            continue
        for v in levels:
            m = values == v
            sub = PolicyOutput(out.probs[m], out.pred[m], out.confidence[m], out.sets[m], out.abstain[m])
            rows[f"{col}={v}"] = _group(sub, preds.labels[m], n_bins)
    return rows


def compute_metrics(
    test: Predictions, policy: TrustPolicy, *, out: PolicyOutput | None = None, n_bins: int = 15
) -> dict[str, Any]:
    """``metrics.json``'s figures from the served outputs ``out`` (what the bundle answered on the test images;
    default: the policy applied to the model's test logits). "uncalibrated" figures are the model's raw softmax."""
    y = test.labels
    out = policy.apply(test.logits, test.slices) if out is None else out
    if len(out.pred) != len(y):
        raise ValueError(f"compute_metrics: {len(out.pred)} served outputs for {len(y)} test rows.")
    raw = softmax(test.logits)
    correct = out.pred == y
    answered = ~out.abstain
    set_size = out.sets.sum(axis=1)
    return {
        "schema": METRICS_SCHEMA,
        "classes": test.classes,
        "test": {
            "n": len(test),
            "accuracy": float(
                correct.mean()
            ),  # of the label served (the operating point's, when there is one)
            "mcc": M.mcc(_decided(out, test.n_classes), y),
            "auroc": M.auroc(out.probs, y),
            "nll": M.nll(out.probs, y),
            "nll_uncalibrated": M.nll(raw, y),
            "brier": M.brier(out.probs, y),
            "ece": {
                "uncalibrated": M.ece(raw, y, n_bins),
                "calibrated": M.ece(out.probs, y, n_bins),
                "bins": n_bins,
                "equal_mass_uncalibrated": M.ece_equal_mass(raw, y, n_bins),
                "equal_mass_calibrated": M.ece_equal_mass(out.probs, y, n_bins),
            },
            "mce": M.mce(out.probs, y, n_bins),
            "classwise_ece": M.classwise_ece(out.probs, y, n_bins),
            "ci95": {  # percentile bootstrap over test images
                "accuracy": M.bootstrap_ci(M.accuracy, _decided(out, test.n_classes), y),
                "ece": M.bootstrap_ci(lambda p, t: M.ece(p, t, n_bins), out.probs, y),
            },
            "aurc": M.aurc(out.confidence, correct),
        },
        "calibration": policy.calibrator.to_dict(),
        "conformal": {
            "method": policy.conformal.method,
            "alpha": policy.conformal.alpha,
            "threshold": policy.conformal.threshold_,
            "n_calib": policy.conformal.n_,
            "coverage": float(out.sets[np.arange(len(y)), y].mean()),
            "mean_set_size": float(set_size.mean()),
            "singleton_rate": float((set_size == 1).mean()),
            "empty_rate": float((set_size == 0).mean()),
        },
        "selective": {
            "method": policy.abstention.method,
            "target_risk": policy.abstention.target_risk,
            "delta": policy.abstention.delta,
            "threshold": policy.abstention.threshold,
            "answers": policy.abstention.answers,
            "coverage": float(answered.mean()),
            # the error on answered images; undefined (null) when nothing is answered, not 0
            "risk": float(1 - correct[answered].mean()) if answered.any() else None,
            "calib_coverage": policy.abstention.coverage,
            "calib_risk_upper_bound": policy.abstention.risk_upper_bound,
            "group_by": policy.abstention.group_by,
            "groups": _group_certificates(policy, out, test),
        },
        "slices": slice_rows(test, out, n_bins),
        "operating_point": _operating_point(policy, out, y),
        "risk_control": _risk_control(policy, out, y),
    }


def request_kind_figures(out: PolicyOutput, labels: np.ndarray) -> dict[str, Any]:
    """What one kind of request gets (with slice metadata, or bare): the share answered, the error on answered
    images (null when none), the conformal coverage and the accuracy of the label served."""
    correct = out.pred == labels
    answered = ~out.abstain
    return {
        "n": len(labels),
        "answered": float(answered.mean()) if len(labels) else None,
        "selective_risk": float(1 - correct[answered].mean()) if answered.any() else None,
        "coverage": float(out.sets[np.arange(len(labels)), labels].mean()) if len(labels) else None,
        "accuracy": float(correct.mean()) if len(labels) else None,
    }


def model_alone_metrics(test: Predictions, policy: TrustPolicy, *, n_bins: int = 15) -> dict[str, Any]:
    """The model alone on its stored test logits, through the policy's calibrator: for comparison with the
    served figures (its sets and abstentions are not what is certified when a cascade is served)."""
    from roadwork.trust.calibration import calibrate_proba

    probs = calibrate_proba(policy.calibrator, test.logits, test.slices)
    raw = softmax(test.logits)
    y = test.labels
    return {
        "what": "the model alone (stored logits through the calibrator), not the served path",
        "accuracy": M.accuracy(probs, y),
        "auroc": M.auroc(probs, y),
        "nll": M.nll(probs, y),
        "ece": M.ece(probs, y, n_bins),
        # the same path before calibration: what the before → after pairs compare with (like with like)
        "nll_raw": M.nll(raw, y),
        "ece_raw": M.ece(raw, y, n_bins),
    }


def _group_certificates(policy: TrustPolicy, out: PolicyOutput, test: Predictions) -> dict[str, Any]:
    """Per slice value with its own abstention certificate: the certificate and the test figures."""
    cert = policy.abstention
    if not cert.groups or cert.group_by not in test.slices:
        return {}
    col = np.asarray(test.slices[cert.group_by]).astype(str)
    rows: dict[str, Any] = {}
    for value, g in sorted(cert.groups.items()):
        m = col == value
        ans = m & ~out.abstain
        rows[value] = {
            "threshold": g.threshold,
            "answers": g.answers,
            "calib_n": g.n,
            "calib_risk_upper_bound": g.risk_upper_bound,
            "test_n": int(m.sum()),
            "test_coverage": float(ans.sum() / m.sum()) if m.any() else None,
            "test_risk": float((out.pred[ans] != test.labels[ans]).mean()) if ans.any() else None,
        }
    return rows


def _risk_control(policy: TrustPolicy, out: PolicyOutput, y: np.ndarray) -> dict[str, Any] | None:
    if policy.risk_control is None or out.positive_possible is None:
        return None
    pos = y == policy.risk_control.positive
    return {
        **policy.risk_control.to_dict(),
        "test_miss_rate": float((~out.positive_possible[pos]).mean()) if pos.any() else 0.0,
        "test_flag_rate": float(out.positive_possible.mean()),
    }


def _operating_point(policy: TrustPolicy, out: PolicyOutput, y: np.ndarray) -> dict[str, Any] | None:
    """Binary tasks: the decision ``score >= 0.5`` (the operating point) on test, next to its calib figures."""
    k = policy.positive_index
    if k is None or out.score is None:
        return None
    pred = out.score >= 0.5
    pos = y == k
    tp, fp, fn = int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & pos).sum())
    tn = len(y) - tp - fp - fn
    denom = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return {
        "chosen": None if policy.operating_point is None else policy.operating_point.to_dict(),
        "positive_class": policy.classes[
            k
        ],  # the class score >= 0.5 (and label, with an operating point) stands for
        "test": {
            "threshold_on_probability": 0.5
            if policy.operating_point is None
            else policy.operating_point.threshold,
            "accuracy": float((pred == pos).mean()),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "mcc": float((tp * tn - fp * fn) / denom) if denom else 0.0,
        },
    }


def calibration_comparison(
    calib: Predictions, test: Predictions, *, n_bins: int = 15
) -> dict[str, dict[str, float]]:
    """Fit every calibrator on the calibration split and score it on test: the before/after table."""
    from roadwork.trust.calibration import METHODS, make_calibrator

    rows: dict[str, dict[str, float]] = {}
    for method in METHODS:
        if method == "auto" or (method == "beta" and calib.n_classes != 2):
            continue
        probs = make_calibrator(method).fit(calib.logits, calib.labels).predict_proba(test.logits)
        y = test.labels
        rows[method] = {
            "nll": M.nll(probs, y),
            "ece": M.ece(probs, y, n_bins),
            "ece_equal_mass": M.ece_equal_mass(probs, y, n_bins),
            "classwise_ece": M.classwise_ece(probs, y, n_bins),
            "brier": M.brier(probs, y),
            "accuracy": M.accuracy(probs, y),
        }
    return rows


def conformal_comparison(calib: Predictions, test: Predictions, policy: TrustPolicy) -> dict[str, Any]:
    """Every conformal method at the policy's α, fitted on the calibrated calibration split and scored on test:
    coverage and mean set size overall and per slice value (the worst slice is what Mondrian is for)."""
    from roadwork.trust.calibration import calibrate_proba
    from roadwork.trust.conformal import SplitConformal

    alpha = policy.conformal.alpha
    p_cal = calibrate_proba(policy.calibrator, calib.logits, calib.slices)
    p_test = calibrate_proba(policy.calibrator, test.logits, test.slices)
    variants: dict[str, tuple[SplitConformal, str | None]] = {
        "lac": (SplitConformal(alpha=alpha, score="lac"), None),
        "aps": (SplitConformal(alpha=alpha, score="aps"), None),
        "raps": (SplitConformal(alpha=alpha, score="raps"), None),
        "lac, Mondrian by class": (SplitConformal(alpha=alpha, score="lac", mondrian="class"), None),
    }
    for column, values in sorted(test.slices.items()):
        if column in calib.slices and len(set(values.tolist())) > 1:
            variants[f"lac, Mondrian by {column}"] = (
                SplitConformal(alpha=alpha, score="lac", mondrian="group"),
                column,
            )
    y = test.labels
    rows: dict[str, Any] = {}
    for name, (conf, col) in variants.items():
        conf.fit(p_cal, calib.labels, None if col is None else calib.slices[col])
        sets = conf.predict_sets(p_test, None if col is None else test.slices[col])
        covered = sets[np.arange(len(y)), y]
        size = sets.sum(axis=1)
        per_slice = {}
        for scol, values in sorted(test.slices.items()):
            for v in sorted(set(values.tolist())):
                m = values == v
                per_slice[f"{scol}={v}"] = {
                    "n": int(m.sum()),
                    "coverage": float(covered[m].mean()),
                    "mean_set_size": float(size[m].mean()),
                }
        worst = min(per_slice, key=lambda k: per_slice[k]["coverage"]) if per_slice else None
        rows[name] = {
            "coverage": float(covered.mean()),
            "mean_set_size": float(size.mean()),
            "worst_slice": worst,
            "worst_slice_coverage": None if worst is None else per_slice[worst]["coverage"],
            "slices": per_slice,
        }
    return {"alpha": alpha, "methods": rows}
