"""Report figures as PNG bytes (matplotlib, Agg backend; nothing is shown on screen)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from roadwork._deps import require
from roadwork.trust import metrics as M

__all__ = ["confusion_png", "image_grid_png", "reliability_png", "risk_coverage_png", "training_png"]


def _plt() -> Any:
    mpl = require("matplotlib")
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def reliability_png(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> bytes:
    """Reliability diagrams (top-label confidence vs accuracy) of the raw and the calibrated probabilities
    (each of shape (n_samples, n_classes)), side by side, as PNG bytes."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, probs, title in (
        (axes[0], raw, "before calibration"),
        (axes[1], calibrated, "after calibration"),
    ):
        counts, conf, acc, edges = M.reliability_bins(probs, labels, n_bins)
        centers = (edges[:-1] + edges[1:]) / 2
        nz = counts > 0
        ax.bar(centers[nz], acc[nz], width=1 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(conf[nz], acc[nz], "o", color="tab:red", ms=4, label="(confidence, accuracy)")
        ax.set_title(f"{title}: ECE {M.ece(probs, labels, n_bins):.4f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return _png(fig)


def risk_coverage_png(
    confidence: np.ndarray, correct: np.ndarray, *, target: float, threshold: float
) -> bytes:
    """Selective risk (error on answered images) against coverage (share answered) on test, with the target
    risk and the certified threshold's coverage marked; PNG bytes."""
    plt = _plt()
    cov, risk = M.risk_coverage(confidence, correct)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(cov, risk, lw=1.5, label=f"test (AURC {M.aurc(confidence, correct):.4f})")
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target risk {target}")
    answered = float((confidence >= threshold).mean())
    ax.axvline(
        answered, color="tab:green", ls=":", lw=1.5, label=f"certified threshold: coverage {answered:.2f}"
    )
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("selective risk (error on answered)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(float(risk[-1]) * 1.5, target * 2, 0.05))
    ax.legend(fontsize=8)
    return _png(fig)


def confusion_png(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) as PNG bytes."""
    plt = _plt()
    cm = M.confusion_matrix(labels, pred, len(classes))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(classes), 1.2 + 1.0 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _png(fig)


def training_png(history: list[dict[str, float]]) -> bytes:
    """Training curves from the loop's history: train and val loss, and val accuracy, per epoch; PNG bytes."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    axes[0].plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    axes[1].plot(ep, [h["val_accuracy"] for h in history], "o-", color="tab:green")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("val accuracy")
    return _png(fig)


def image_grid_png(paths: Sequence[str], captions: Sequence[str], *, cols: int = 8, tile: int = 128) -> bytes:
    """Thumbnails with a caption strip each (PIL only, no figure overhead)."""
    n = len(paths)
    rows = max(1, -(-n // cols))
    cap_h = 26
    grid = Image.new("RGB", (cols * tile, rows * (tile + cap_h)), "white")
    d = ImageDraw.Draw(grid)
    for i, (p, cap) in enumerate(zip(paths, captions, strict=True)):
        x, y = (i % cols) * tile, (i // cols) * (tile + cap_h)
        try:
            with Image.open(p) as im:
                grid.paste(im.convert("RGB").resize((tile, tile)), (x, y))
        except OSError:
            d.text((x + 4, y + 4), "unreadable", fill="red")
        for k, line in enumerate(cap.split("\n")[:2]):
            d.text((x + 3, y + tile + 1 + 12 * k), line, fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()
