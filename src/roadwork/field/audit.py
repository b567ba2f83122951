"""Label audit: which labels the certificates rest on are likely wrong, and how often labels flip per class.

Confident learning (Northcutt, Jiang & Chuang 2021) through cleanlab, on **out-of-sample** probabilities only (a
model's probabilities on its own training rows are overconfident and hide its label errors): the calibration and
test splits through the trained model and the calibrator. The training split is not audited: the network has
fitted its labels, and out-of-fold predictions would mean training it k times over (a cheap model on its features
inherits the same fit); a label error there costs accuracy, not a guarantee.

The flip rate is the share of labels confident learning flags (the off-diagonal mass of the confident joint
``C``, cleanlab's ``filter_by="confident_learning"``), overall and per given class; that share is what
``conformal.label_flip_rate`` takes. Cleanlab's calibrated joint (``C`` rescaled to the given label counts,
reported as ``joint``) was the other candidate: on the demo run with 5 % / 10 % of its labels flipped and its
temperature refitted on them, the flagged share is 4.4 % / 8.8 % and the calibrated joint 6.2 % / 12.1 %
(``benchmarks/label_audit.py``); an over-estimate makes the corrected sets under-cover, an under-estimate keeps
them conservative. Either way a model's own confident mistakes on hard images look like flips: on clean labels the
demo reads about 2 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork.errors import InputError

__all__ = ["MATERIAL_FLIP_RATE", "label_audit", "write_audit"]

MATERIAL_FLIP_RATE = 0.03
"""An estimated flip rate above this is worth correcting for (``conformal.label_flip_rate``): below it, a model's
own confident mistakes on hard images are as likely (the demo's clean generated labels read 1.8 %), and uniform
label noise that small only makes the sets slightly larger than they need be."""


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
    issues = find_label_issues(
        y, p, filter_by="confident_learning", return_indices_ranked_by="self_confidence"
    )
    flagged = np.zeros(len(y), dtype=bool)
    flagged[issues] = True
    per_class = {c: float(flagged[y == i].mean()) for i, c in enumerate(classes)}
    overall = float(flagged.mean())
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


def write_audit(
    out: Path,
    probs: np.ndarray,
    labels: np.ndarray,
    ids: list[str],
    classes: list[str],
    path_of: dict[str, Any],
    *,
    top: int = 12,
    csv_name: str = "label_issues.csv",
    json_name: str = "audit.json",
) -> tuple[dict[str, Any], str]:
    """:func:`label_audit`, its files in ``out`` (the issues with their image paths as CSV, the rates as JSON,
    each written whole) and the report section with the ``top`` suspects' thumbnails."""
    import json

    import pandas as pd

    from roadwork.evaluation.report import label_audit_html

    result = label_audit(probs, labels, classes, ids)
    for row in result["issues"]:
        row["path"] = str(path_of.get(row["id"], ""))
    out.mkdir(parents=True, exist_ok=True)
    issues = pd.DataFrame(result["issues"], columns=["id", "path", "given", "suggested", "score"])
    tmp = out / f".{csv_name}.tmp"
    issues.to_csv(tmp, index=False)
    tmp.replace(out / csv_name)
    summary = {k: v for k, v in result.items() if k != "issues"} | {"n_issues": len(issues)}
    tmp = out / f".{json_name}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / json_name)
    suspects = [r | {"thumb": _thumb(path_of.get(r["id"]))} for r in result["issues"][: max(0, int(top))]]
    return result, label_audit_html(result, suspects)


def _thumb(path: Path | None, side: int = 140) -> bytes | None:
    """A small JPEG of an image for the report (None when it cannot be read)."""
    import io

    from PIL import Image

    if path is None:
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
            return buf.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
