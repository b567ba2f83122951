"""Label audit: which labels the certificates rest on are likely wrong, and how often labels flip per class.

Confident learning (Northcutt, Jiang & Chuang 2021) through cleanlab, on **out-of-sample** probabilities only (a
model's probabilities on its own training rows are overconfident and hide its label errors): the calibration and
test splits through the trained model and the calibrator. For each given class ``i`` the estimated flip rate is
``1 − J[i, i] / Σ_j J[i, j]`` from cleanlab's estimated joint ``J`` of (given label, true label); the overall rate
``1 − trace(J)`` is what ``conformal.label_flip_rate`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork.errors import InputError

__all__ = ["MATERIAL_FLIP_RATE", "label_audit"]

MATERIAL_FLIP_RATE = 0.01
"""An estimated flip rate above this is worth correcting for (``conformal.label_flip_rate``)."""


def label_audit(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], ids: Sequence[str]
) -> dict[str, Any]:
    """Likely label errors and flip rates from out-of-sample ``probs`` (n, K) and given ``labels`` (n,): the
    issues ranked most suspect first (``id``, ``given``, ``suggested``, ``score`` = cleanlab's label quality), the
    flip rate per given class and overall, and the ``label_flip_rate`` to configure when it is material."""
    require("cleanlab")
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if p.ndim != 2 or len(p) != len(y) or len(ids) != len(y) or p.shape[1] != len(classes):
        raise InputError(
            f"label_audit: probs {p.shape}, labels {y.shape}, {len(ids)} ids and {len(classes)} classes do not agree."
        )
    present = np.bincount(y, minlength=len(classes))
    if (present == 0).any():
        missing = [c for c, n in zip(classes, present, strict=True) if n == 0]
        raise InputError(f"label_audit: no row is labelled {missing}; audit a split that has every class.")
    joint = estimate_joint(y, p)
    per_class = {
        c: float(1 - joint[i, i] / joint[i].sum()) if joint[i].sum() > 0 else 0.0
        for i, c in enumerate(classes)
    }
    overall = float(1 - np.trace(joint))
    issues = find_label_issues(y, p, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(y, p)
    rows = [
        {
            "id": str(ids[i]),
            "given": classes[y[i]],
            "suggested": classes[int(p[i].argmax())],
            "score": round(float(quality[i]), 6),
        }
        for i in issues
    ]
    return {
        "n": len(y),
        "issues": rows,
        "flip_rate": overall,
        "flip_rate_per_class": per_class,
        "joint": joint.tolist(),
        "suggested_label_flip_rate": round(overall, 4) if overall > MATERIAL_FLIP_RATE else None,
    }
