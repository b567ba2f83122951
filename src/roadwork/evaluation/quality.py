"""Is the model worth certifying? Checked on the test split before any calibration or conformal figure is read.

A model that outputs 0.5 everywhere gets a valid conformal coverage (every set holds both classes) and a calibration
"improvement" (ECE falls as the probabilities shrink to the base rate): the trust layer's figures are true of a
useless model. So the run first asks, of the model alone (its own test logits, no policy):

- **no better than chance**: the 95 % bootstrap interval of the MCC includes 0, or that of the AUROC includes 0.5;
- **a constant**: one class takes every prediction;
- **did not learn**: the validation loss never went below ln K (what a uniform guess scores);
- **far below what the data gives**: a logistic regression on the cheap colour/edge features
  (:mod:`roadwork.data.features`), fitted on the same training split, is right on significantly more test images
  (paired: the images one gets right and the other wrong, a two-sided 5 % normal test).

Each finding is a warning with what to do; :func:`model_check` returns them with the figures (``metrics.json``
``model_check``), and the CLI, the report's headline and the model card show them before the calibration figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from roadwork.trust import metrics as M

__all__ = ["CHANCE", "feature_baseline", "model_check", "paired_gap"]

CHANCE = "no better than chance"
"""The phrase every chance-level warning carries (tests and users search for it)."""


def _interval(
    metric: Any, probs: np.ndarray, labels: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float]:
    lo, hi = M.bootstrap_ci(metric, probs, labels, n_boot=n_boot, seed=seed)
    return float(lo), float(hi)


def paired_gap(model_correct: np.ndarray, other_correct: np.ndarray) -> tuple[float, float]:
    """``(accuracy of other − accuracy of model, its standard error)`` on the same images: the paired difference
    of two proportions (only images where they disagree carry information)."""
    n = len(model_correct)
    b = float(np.sum(other_correct & ~model_correct))  # other right, model wrong
    c = float(np.sum(model_correct & ~other_correct))
    gap = (b - c) / max(n, 1)
    se = math.sqrt(max(b + c - (b - c) ** 2 / max(n, 1), 0.0)) / max(n, 1)
    return gap, se


def _advice(pretrained: bool, scratch: bool = False) -> str:
    labels = "Check the labels first (a shuffled or misaligned label column gives exactly this). "
    if not pretrained and scratch:
        return labels + (
            "This run already used the from-scratch recipe: pretrained weights (model.weights=FILE, or "
            "finetune-cpu/finetune-gpu online) are what does far better; more labelled images help too."
        )
    if not pretrained:
        return labels + (
            "No pretrained weights were used: the from-scratch recipe learns on small sets (roadwork run scratch "
            "data.source=..., picked by itself for model.pretrained=false with no CONFIG); pretrained weights "
            "(model.weights=FILE, or finetune-cpu/finetune-gpu online) do far better."
        )
    return (
        labels + "Then train longer (train.epochs, train.patience) or with a larger learning rate (train.lr)."
    )


def _baseline_finding(
    out: dict[str, Any],
    model_correct: np.ndarray,
    baseline_correct: np.ndarray | None,
    warnings: list[str],
    advice: str,
) -> bool:
    """The feature baseline beside the model (``out["baseline"]``); True, with a warning, when it is right on
    significantly more test images (paired, two-sided 5 %)."""
    n = len(model_correct)
    if baseline_correct is None or len(baseline_correct) != n or not n:
        return False
    gap, se = paired_gap(model_correct, np.asarray(baseline_correct, dtype=bool))
    out["baseline"] = {
        "what": "logistic regression on cheap colour/edge features, same training split",
        "accuracy": float(np.mean(baseline_correct)),
        "gap": gap,
        "gap_se": se,
    }
    if not (gap > 1.96 * se and gap > 0):
        return False
    warnings.append(
        f"The model is far below what this data gives: test accuracy {out['accuracy']:.3f} where a logistic "
        f"regression on cheap colour and edge features of the same training images reaches "
        f"{out['baseline']['accuracy']:.3f} (paired difference {gap:.3f} ± {1.96 * se:.3f}). " + advice
    )
    return True


def model_check(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    val_losses: Sequence[float] = (),
    baseline_correct: np.ndarray | None = None,
    pretrained: bool = True,
    scratch: bool = False,
    n_boot: int = 400,
    seed: int = 0,
) -> dict[str, Any]:
    """The model alone on the test split: ``{"verdict": "ok" | "chance" | "weak", figures..., "warnings": [...]}``.

    ``logits``: the model's test logits, shape (n, K); ``labels``: shape (n,); ``val_losses``: the validation loss
    of every epoch; ``baseline_correct``: whether the feature baseline got each test image right (shape (n,));
    ``pretrained``: whether the network started from pretrained weights, ``scratch``: whether it is the
    from-scratch recipe's network (the advice differs).
    """
    from roadwork.trust import softmax

    probs = softmax(np.asarray(logits, dtype=np.float64))
    y = np.asarray(labels)
    n, k = probs.shape
    pred = probs.argmax(axis=1)
    shares = np.bincount(pred, minlength=k) / max(n, 1)
    out: dict[str, Any] = {
        "what": "the model alone on the test split (its raw logits), before calibration and policy",
        "n": n,
        "accuracy": M.accuracy(probs, y),
        "mcc": M.mcc(probs, y),
        "mcc_ci95": _interval(M.mcc, probs, y, n_boot, seed),
        "auroc": M.auroc(probs, y),
        "auroc_ci95": _interval(M.auroc, probs, y, n_boot, seed),
        "constant_accuracy": float(np.bincount(y, minlength=k).max() / max(n, 1)),
        "top_prediction_share": float(shares.max()),
        "ln_k": math.log(k),
        "best_val_loss": float(min(val_losses)) if len(val_losses) else None,
    }
    warnings: list[str] = []
    lo_mcc, lo_auc = out["mcc_ci95"][0], out["auroc_ci95"][0]
    chance = lo_mcc <= 0 or not lo_auc > 0.5
    if chance:
        which = [
            *(["the MCC interval includes 0"] if lo_mcc <= 0 else []),
            *(["the AUROC interval includes 0.5"] if not lo_auc > 0.5 else []),
        ]
        warnings.append(
            f"The model is {CHANCE} on the test split ({' and '.join(which)}): MCC {out['mcc']:.3f} (95 % "
            f"interval {lo_mcc:.3f} to {out['mcc_ci95'][1]:.3f}), AUROC {out['auroc']:.3f} (95 % interval "
            f"{lo_auc:.3f} to {out['auroc_ci95'][1]:.3f}) on {n} images. The calibration, coverage and abstention "
            "figures below are valid for such a model and mean nothing useful. "
            + _advice(pretrained, scratch)
        )
    if shares.max() == 1.0:
        warnings.append(
            f"The model is a constant: it predicts {classes[int(shares.argmax())]!r} for every test image "
            f"(accuracy {out['accuracy']:.3f}, which a constant guess of the majority class gets: "
            f"{out['constant_accuracy']:.3f}). " + _advice(pretrained, scratch)
        )
    best = out["best_val_loss"]
    if best is not None and best >= out["ln_k"] - 0.005:
        warnings.append(
            f"Training did not learn: the validation loss never went below ln {k} = {out['ln_k']:.4f} (what a "
            f"uniform guess scores; best {best:.4f}). " + _advice(pretrained, scratch)
        )
    weak = _baseline_finding(out, pred == y, baseline_correct, warnings, _advice(pretrained, scratch))
    out["verdict"] = "chance" if chance or shares.max() == 1.0 else "weak" if weak or warnings else "ok"
    out["warnings"] = warnings
    return out


def feature_baseline(
    train_images: Sequence[Any],
    train_labels: np.ndarray,
    test_images: Sequence[Any],
    test_labels: np.ndarray,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Whether a logistic regression on :func:`~roadwork.data.features.images_features` of ``train_images`` (PIL
    images) gets each of ``test_images`` right: shape (n_test,) bool. Needs scikit-learn (the train extra)."""
    from roadwork._deps import require
    from roadwork.data.features import images_features

    require("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test = images_features(train_images), images_features(test_images)
    if len(np.unique(train_labels)) < 2:
        return np.asarray(test_labels) == int(np.asarray(train_labels)[0])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    clf.fit(x_train, np.asarray(train_labels))
    return np.asarray(clf.predict(x_test) == np.asarray(test_labels))
