"""Metrics as pure array functions: numpy in, numpy/float out.

``probs`` is an ndarray of shape (n_samples, n_classes) with rows summing to one; ``labels`` holds
integer class indices of shape (n_samples,).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "accuracy",
    "aurc",
    "auroc",
    "binary_auroc",
    "bootstrap_ci",
    "brier",
    "classwise_ece",
    "confusion_matrix",
    "ece",
    "ece_equal_mass",
    "mcc",
    "mce",
    "nll",
    "reliability_bins",
    "risk_coverage",
]


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax class is the label (``probs`` of shape (n, K)); NaN for no rows."""
    return float(np.mean(probs.argmax(axis=1) == labels)) if len(labels) else float("nan")


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels, probabilities clipped below at ``eps``."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, None))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - 1[y=k])^2."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> tuple[np.ndarray, ...]:
    """Equal-width bins of max-probability confidence: (counts, mean confidence, accuracy, edges)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # bins are (lo, hi]
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / counts
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / counts
    return counts, mean_conf, acc, edges


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins (Guo et al., 2017)."""
    if len(labels) == 0:
        return float("nan")
    counts, conf, acc, _ = reliability_bins(probs, labels, n_bins)
    nz = counts > 0
    return float(np.sum(counts[nz] * np.abs(acc[nz] - conf[nz])) / counts.sum())


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of shape (n_classes, n_classes): rows are true classes, columns predictions."""
    return np.bincount(labels * n_classes + pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def mcc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin, 2004)."""
    cm = confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1]).astype(np.float64)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    denom = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def binary_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``score`` (shape (n,)) for the boolean ``positive`` (shape (n,)): the probability that a positive
    row scores above a negative one, ties counting half (Mann–Whitney U); nan when either class is absent."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # average ranks handle ties (Mann–Whitney U)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary AUROC of class 1's probability; macro one-vs-rest for more classes."""
    if probs.shape[1] == 2:
        return binary_auroc(probs[:, 1], labels == 1)
    vals = [binary_auroc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    return float(np.nanmean(vals))


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Answer the k most confident images, for k = 1..n: returns (coverage k/n, selective risk)."""
    order = np.argsort(-confidence, kind="stable")
    err = (~correct.astype(bool))[order].astype(np.float64)
    k = np.arange(1, len(err) + 1)
    return k / len(err), np.cumsum(err) / k


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk–coverage curve (mean selective risk over coverages k/n)."""
    if len(confidence) == 0:
        return float("nan")
    return float(np.mean(risk_coverage(confidence, correct)[1]))


def ece_equal_mass(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with bins holding equal numbers of images (adaptive binning, Nixon et al., 2019)."""
    n = len(labels)
    if n == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    bins = np.array_split(order, min(n_bins, n))
    return float(sum(len(b) * abs(correct[b].mean() - conf[b].mean()) for b in bins if len(b)) / n)


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Maximum calibration error over non-empty equal-width bins."""
    counts, conf, acc, _ = reliability_bins(probs, labels, n_bins)
    nz = counts > 0
    return float(np.max(np.abs(acc[nz] - conf[nz]))) if nz.any() else float("nan")


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Mean over classes of the equal-width ECE of each class's one-vs-rest probability (Kull et al., 2019)."""
    n, k = probs.shape
    if n == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for c in range(k):
        p = probs[:, c]
        hit = (labels == c).astype(np.float64)
        idx = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)
        cnt = np.bincount(idx, minlength=n_bins).astype(np.float64)
        gap = np.abs(
            np.bincount(idx, weights=hit, minlength=n_bins) - np.bincount(idx, weights=p, minlength=n_bins)
        )
        total += float(gap.sum() / n) if cnt.any() else 0.0
    return total / k


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(probs, labels)`` over resampled images."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    vals = np.array([metric(probs[i], labels[i]) for i in (rng.integers(0, n, n) for _ in range(n_boot))])
    lo, hi = np.nanquantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
