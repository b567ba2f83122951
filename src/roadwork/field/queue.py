"""What to label next: the stored answers that have no label yet, in the order a labelling team should take them.

1. ``audit``: the uniform audit sample, oldest first: the field estimates and the guarantees on the labelled
   stream rest on it alone, so it goes first, whole;
2. ``abstained``: answers the server abstained on, least sure first (the smallest gap between the two most
   probable classes): a human had to decide these anyway, and they teach the most;
3. ``new slice``: answers whose slice value (``weather=...``) the store has seen fewer than ``rare_below`` times:
   where drift shows first;
4. ``uncertain``: the remaining answers nearest the decision, least sure first.

Only the first group is a random sample; labels of the others feed learning (online control, recertify with
``labels=all``), never the field estimates.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path
from typing import Any

from roadwork.field.store import FieldStore, StoredPrediction

__all__ = ["label_queue"]


def _margin(p: StoredPrediction) -> float:
    top = sorted(p.probs, reverse=True)
    return float(top[0] - top[1]) if len(top) > 1 else 1.0


def label_queue(
    store: FieldStore,
    n: int = 200,
    *,
    images: str | Path | None = None,
    rare_below: int = 20,
    scan: int = 100_000,
) -> list[dict[str, Any]]:
    """Up to ``n`` unlabelled answers (of the newest ``scan``), ranked as the module docstring says; each with
    its ``reason`` and, when ``images`` (a ``log_images`` folder) holds it, the captured image's path."""
    rows = store.unlabelled(limit=scan)
    seen = Counter((k, v) for p in rows for k, v in p.meta.items())
    groups: list[tuple[str, list[StoredPrediction]]] = [
        ("audit", sorted((p for p in rows if p.audit), key=lambda p: p.ts)),
        ("abstained", sorted((p for p in rows if p.abstain), key=_margin)),
        ("new slice", [p for p in rows if any(seen[(k, v)] < rare_below for k, v in p.meta.items())]),
        ("uncertain", sorted(rows, key=_margin)),
    ]
    folder = Path(images) if images is not None else None
    out: list[dict[str, Any]] = []
    taken: set[str] = set()
    for reason, group in groups:
        for p in group:
            if len(out) >= n:
                return out
            if p.id in taken:
                continue
            taken.add(p.id)
            image = next(iter(sorted(folder.glob(f"{p.id}.*"))), None) if folder is not None else None
            out.append(
                {
                    "rank": len(out) + 1,
                    "id": p.id,
                    "reason": reason,
                    "served": p.label,
                    "probability": round(max(p.probs), 4) if p.probs else None,
                    "abstain": p.abstain,
                    "prediction_set": "|".join(p.pred_set),
                    "time": dt.datetime.fromtimestamp(p.ts, dt.timezone.utc).isoformat(timespec="seconds"),
                    "policy_version": p.policy_version,
                    **{f"meta.{k}": v for k, v in p.meta.items()},
                    "image": str(image) if image is not None else "",
                }
            )
    return out
