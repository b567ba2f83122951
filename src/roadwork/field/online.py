"""Online conformal under drift: the served sets' threshold follows the labelled stream.

Conformal quantile tracking (the P part of conformal PID control, Angelopoulos, Candès & Tibshirani 2023; the
threshold form of adaptive conformal inference, Gibbs & Candès 2021): the calibrated score threshold ``t`` of the
bundle's policy is served as ``t + offset``, and every label that comes back, in the order labels arrive,
moves the offset of its group by

    offset ← offset + η · (err − α),   err = 1 if the true class was not in the set served for that image.

No exchangeability is assumed. For scores in [0, B] (B = 1 for LAC, 1 + λ·K for RAPS), whatever the
distribution shift, the miscoverage averaged over the T labelled answers of a group satisfies

    | (1/T) Σ err_t − α | ≤ (B + η) / (η · T)

(Angelopoulos et al. 2023, Proposition 1: the offset stays in [−α·η, B + η], and the sum of its steps is the
offset's total change). The guarantee is about the labelled stream: with feedback on a uniform random sample
(``audit_rate``), the labelled stream is a uniform sample of the traffic. Label delay does not change the bound:
each update uses the set that was served, whenever its label arrives.

With Mondrian groups (``conformal.mondrian=group``) each group value has its own offset; otherwise one offset,
``"all"``. The state (offsets and counts) lives in the field store, so replicas share it and a restart keeps it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["OnlineConformal", "shifted"]


@dataclass
class OnlineConformal:
    """Quantile tracking of the conformal threshold (module docstring). ``eta``: the step (in score units)."""

    alpha: float
    eta: float = 0.05
    offsets: dict[str, float] = field(default_factory=dict)
    labelled: dict[str, int] = field(default_factory=dict)
    miscovered: dict[str, int] = field(default_factory=dict)

    def update(self, errors: Iterable[tuple[str, bool]]) -> None:
        """Apply labelled answers in arrival order: ``(group, the true class was not in the served set)``."""
        for group, err in errors:
            self.offsets[group] = self.offsets.get(group, 0.0) + self.eta * (float(err) - self.alpha)
            self.labelled[group] = self.labelled.get(group, 0) + 1
            self.miscovered[group] = self.miscovered.get(group, 0) + int(err)

    def offset(self, group: str = "all") -> float:
        return self.offsets.get(group, 0.0)

    def bound(self, group: str = "all", score_max: float = 1.0) -> float | None:
        """The guarantee's bound on |mean miscoverage − α| after this group's labels so far (None: none yet)."""
        n = self.labelled.get(group, 0)
        return (score_max + self.eta) / (self.eta * n) if n else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "eta": self.eta,
            "offsets": self.offsets,
            "labelled": self.labelled,
            "miscovered": self.miscovered,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineConformal:
        return cls(
            float(d["alpha"]),
            float(d["eta"]),
            {str(k): float(v) for k, v in d.get("offsets", {}).items()},
            {str(k): int(v) for k, v in d.get("labelled", {}).items()},
            {str(k): int(v) for k, v in d.get("miscovered", {}).items()},
        )


def shifted(conformal: Any, online: OnlineConformal) -> Any:
    """A copy of a fitted ``SplitConformal`` whose thresholds carry the online offsets (the original is left as
    it is: swap the copy in)."""
    out = copy.copy(conformal)
    base = online.offset("all")
    out.thresholds_ = np.asarray(conformal.thresholds_, dtype=np.float64) + base
    out.threshold_ = float(conformal.threshold_) + base
    if getattr(conformal, "group_thresholds_", None):
        out.group_thresholds_ = {
            v: float(t) + online.offsets.get(v, base) for v, t in conformal.group_thresholds_.items()
        }
    return out
