"""Online control under drift: the served thresholds follow the labelled stream.

Three thresholds of the bundle's certified policy are served as ``certified + offset``, and every label that
comes back, in the order labels arrive, moves the offset of its kind and group (conformal quantile tracking, the P
part of conformal PID control, Angelopoulos, Candès & Tibshirani 2023; the threshold form of adaptive conformal
inference, Gibbs & Candès 2021; for risks, online risk control, Feldman et al. 2023):

- ``sets`` (the conformal score threshold; every labelled answer):
  ``offset ← offset + η · (miscovered − α)``;
- ``abstain`` (the confidence threshold below which the server abstains; labelled answers that were *answered*):
  ``offset ← offset + η · (wrong − target_risk)``;
- ``miss`` (the false-negative control's score threshold, policies with ``risk_control``; labelled answers whose
  true class is the positive one): ``offset ← offset − η · (missed − alpha_miss)``.

No exchangeability is assumed. Each offset's total change is its step η times the sum of its losses minus their
target,
and the threshold it moves stays in a bounded range whatever the stream, which gives, after T updates of one
group, with at most D labels in flight (served, not yet labelled: the label delay), deterministically, for any
distribution shift:

- sets, scores in [0, B] (B = 1 for LAC, 1 + λ·K for RAPS):
  ``|mean miscoverage − α| ≤ (B + η·(1 + D)) / (η·T)`` (Angelopoulos et al. 2023, Proposition 1, for D = 0: above
  B every set served is full, so only the D answers already in flight can still push the threshold up);
- abstain, confidence in [0, 1], certified threshold t₀:
  ``mean error on answered − target ≤ (1 − t₀ + η·(1 + D)) / (η·T)`` with T the labelled *answered* images
  (above 1 nothing is answered);
- miss, scores in [0, 1], certified threshold t₀: ``mean miss rate − alpha_miss ≤ (t₀ + η·(1 + D)) / (η·T)`` with T
  the labelled positives (below 0 every image is flagged, so nothing is missed).

The D term is a worst case (every label in flight a loss); measured on a drifting stream it is far smaller
(``benchmarks/field_drift.py``). The guarantees are about the labelled stream: with labels on a uniform random
sample (``audit_rate``), the labelled stream is a uniform sample of the traffic. Each update uses what was served
for that image, whenever its label arrives. The abstention offset learns only from answered images: if drift
pushes it to abstain on everything, it stays there (the safe side) until ``roadwork recertify``.

Groups: the sets' offsets per Mondrian group value (``conformal.mondrian=group``), the abstention's per value of
its ``group_by`` where it has group certificates, the miss rate's per value of its ``group_by``; otherwise one
offset, ``"all"``. The state lives in the field store, so replicas share it and a restart keeps it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["OnlineControl", "Outcome", "online_groups", "shifted", "shifted_sets"]


@dataclass(frozen=True)
class Outcome:
    """What a label says about one served answer. ``groups``: the group value of each kind (absent: ``"all"``);
    ``missed``: None unless the true class is the positive one of a policy with ``risk_control``."""

    covered: bool  # the true class was in the served set
    answered: bool  # the server did not abstain
    wrong: bool  # the served decision was not the true class
    missed: bool | None = None  # a positive the served miss-rate control did not flag
    groups: Mapping[str, str] = field(default_factory=dict)


def _bump(table: dict[str, dict[str, Any]], kind: str, group: str, by: float) -> None:
    row = table.setdefault(kind, {})
    row[group] = row.get(group, 0) + by


@dataclass
class OnlineControl:
    """The offsets of the served thresholds (module docstring). ``target_risk``/``miss_alpha`` None: that
    threshold is not moved. ``eta``: the step, in score units; ``scales``: a kind's step is ``eta`` times its
    scale (the server gives the abstention 1 − t₀, the room above its certified threshold: a step of η in
    confidence would cross a 0.9 threshold's whole range in two errors)."""

    alpha: float
    eta: float = 0.05
    target_risk: float | None = None
    miss_alpha: float | None = None
    scales: dict[str, float] = field(default_factory=dict)
    offsets: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> group -> offset
    updates: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> group -> labels used
    losses: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # kind -> group -> miscovered/wrong/missed

    @classmethod
    def for_policy(cls, policy: Any, eta: float = 0.05) -> OnlineControl:
        """What the server runs for a certified ``TrustPolicy``: the sets always; the abstention where a threshold
        is certified (step scaled by the room above it); the miss rate where the policy has a finite one."""
        fnr, abstention = policy.risk_control, policy.abstention
        certified = abstention.answers == "some"
        return cls(
            alpha=float(policy.conformal.alpha),
            eta=eta,
            target_risk=float(abstention.target_risk) if certified else None,
            miss_alpha=float(fnr.alpha) if fnr is not None and math.isfinite(fnr.threshold_) else None,
            scales={"abstain": max(1.0 - float(abstention.threshold), 0.01)} if certified else {},
        )

    def update(self, outcomes: Iterable[Outcome]) -> None:
        """Apply labelled answers in arrival order."""
        for o in outcomes:
            steps = [("sets", not o.covered, self.alpha, 1.0)]
            if self.target_risk is not None and o.answered:
                steps.append(("abstain", o.wrong, self.target_risk, 1.0))
            if self.miss_alpha is not None and o.missed is not None:
                steps.append(("miss", o.missed, self.miss_alpha, -1.0))
            for kind, loss, target, sign in steps:
                group = o.groups.get(kind, "all")
                _bump(self.offsets, kind, group, sign * self.step(kind) * (float(loss) - target))
                _bump(self.updates, kind, group, 1)
                _bump(self.losses, kind, group, int(loss))

    def step(self, kind: str = "sets") -> float:
        """η for this kind: ``eta`` times its scale."""
        return self.eta * self.scales.get(kind, 1.0)

    def offset(self, kind: str = "sets", group: str = "all") -> float:
        """The offset served for ``group`` (a group with no labels yet gets the global one)."""
        row = self.offsets.get(kind, {})
        return float(row.get(group, row.get("all", 0.0)))

    def rate(self, kind: str = "sets", group: str = "all") -> float | None:
        """The long-run loss rate so far: miscoverage, error on answered, or miss rate (None: no labels yet)."""
        n = self.updates.get(kind, {}).get(group, 0)
        return self.losses.get(kind, {}).get(group, 0) / n if n else None

    def bound(
        self, kind: str = "sets", group: str = "all", *, scale: float = 1.0, delay: int = 0
    ) -> float | None:
        """The guarantee's bound after this group's labels so far (module docstring): ``scale`` is B for sets,
        1 − t₀ for abstain, t₀ for miss; ``delay`` the most labels in flight. None: no labels yet."""
        n, eta = self.updates.get(kind, {}).get(group, 0), self.step(kind)
        return (max(scale, 0.0) + eta * (1 + delay)) / (eta * n) if n else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineControl:
        def table(name: str, cast: type) -> dict[str, dict[str, Any]]:
            return {str(k): {str(g): cast(v) for g, v in row.items()} for k, row in d.get(name, {}).items()}

        def maybe(name: str) -> float | None:
            return None if d.get(name) is None else float(d[name])

        return cls(
            float(d["alpha"]),
            float(d["eta"]),
            maybe("target_risk"),
            maybe("miss_alpha"),
            {str(k): float(v) for k, v in d.get("scales", {}).items()},
            table("offsets", float),
            table("updates", int),
            table("losses", int),
        )


def shifted_sets(conformal: Any, online: OnlineControl) -> Any:
    """A copy of a fitted ``SplitConformal`` whose thresholds carry the online ``sets`` offsets."""
    c = copy.copy(conformal)
    base = online.offset("sets")
    c.thresholds_ = np.asarray(conformal.thresholds_, dtype=np.float64) + base
    c.threshold_ = float(conformal.threshold_) + base
    if getattr(conformal, "group_thresholds_", None):
        c.group_thresholds_ = {
            v: float(t) + online.offset("sets", v) for v, t in conformal.group_thresholds_.items()
        }
    return c


def shifted(policy: Any, online: OnlineControl) -> dict[str, Any]:
    """The parts of a certified ``TrustPolicy`` to serve under ``online``: copies of its ``conformal``,
    ``abstention`` and ``risk_control`` with the offsets added (the originals are left as they are)."""
    parts: dict[str, Any] = {"conformal": shifted_sets(policy.conformal, online)}
    a = policy.abstention
    if online.target_risk is not None and math.isfinite(a.threshold):
        groups = {
            v: dataclasses.replace(g, threshold=g.threshold + online.offset("abstain", v))
            for v, g in a.groups.items()
        }
        parts["abstention"] = dataclasses.replace(
            a, threshold=a.threshold + online.offset("abstain"), groups=groups
        )
    fnr = policy.risk_control
    if fnr is not None and online.miss_alpha is not None and math.isfinite(fnr.threshold_):
        f = copy.copy(fnr)
        f.threshold_ = fnr.threshold_ + online.offset("miss")
        f.group_thresholds_ = {v: t + online.offset("miss", v) for v, t in fnr.group_thresholds_.items()}
        parts["risk_control"] = f
    return parts


def online_groups(policy: Any) -> dict[str, str]:
    """The slice column whose value is each kind's group, where that part of the policy is grouped."""
    out = {}
    if policy.conformal.mondrian == "group" and policy.conformal.group_by:
        out["sets"] = policy.conformal.group_by
    if policy.abstention.groups and policy.abstention.group_by:
        out["abstain"] = policy.abstention.group_by
    if policy.risk_control is not None and policy.risk_control.group_by:
        out["miss"] = policy.risk_control.group_by
    return out
