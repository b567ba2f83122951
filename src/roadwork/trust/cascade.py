"""Cost-aware cascades: cheap stages answer the images they are sure of, the rest go on to the next stage.

Stage ``s < last`` answers a row when its *calibrated* confidence is at least the gate threshold ``λ``; the
last stage answers everything that reaches it. The gates share one threshold ``λ``, which makes the cascade a
one-parameter family ordered from strict (λ near 1: everything reaches the last stage) to loose, and mean
cost falls monotonically as λ falls. That order is fixed before the data are seen, so **fixed-sequence
testing** (Learn-then-Test, Angelopoulos et al. 2021) certifies the threshold with no multiplicity
correction: walk λ down the grid, test H0: risk(λ) > target with the exact binomial p-value
``P(Binomial(n, target) <= errors)``, stop at the first λ whose p-value exceeds δ, and keep the last one that
passed — the cheapest certified cascade. With probability ≥ 1 − δ over the calibration draw its risk on new
images from the same distribution is ≤ target.

Two risks (``mode``):

- ``risk``: the cascade's error rate (answer ≠ label) ≤ ``target``;
- ``match``: the rate of images the cascade gets wrong *and the last stage alone gets right* ≤ ``target``,
  so accuracy(cascade) ≥ accuracy(last stage) − target: "as good as the big model, within a margin".

:func:`select_cascade` also chooses *which* earlier stages to keep: every subset (the last stage always stays)
is certified at δ/m for m subsets, so by the union bound all certificates hold together with probability
≥ 1 − δ, and the one with the lowest mean cost on the calibration rows is kept — a stage that costs more
than it saves (or the whole cascade) is dropped.

Gates never go below ``floor`` (the policy's certified abstention threshold), so an image answered early is
never one the policy would abstain on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from roadwork.errors import InputError, RoadworkWarning
from roadwork.jsonio import threshold_from_json, threshold_to_json
from roadwork.trust._checks import check_labels, check_level
from roadwork.trust.calibration import Calibrator, calibrator_from_dict
from roadwork.trust.selective import binomial_pvalue

__all__ = [
    "Cascade",
    "CascadeStage",
    "cascade_curve",
    "fit_cascade",
    "gate_grid",
    "route",
    "run_cascade",
    "select_cascade",
]

Mode = Literal["risk", "match"]


@dataclass
class CascadeStage:
    """One model of a cascade. ``file`` names its model inside the bundle; ``calibrator`` is None for the last
    stage (the policy's own calibrator calibrates it)."""

    name: str
    kind: Literal["boosting", "network"]
    file: str
    cost_ms: float
    calibrator: Calibrator | None = None
    flops: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "file": self.file,
            "cost_ms": self.cost_ms,
            "flops": self.flops,
            "calibrator": None if self.calibrator is None else self.calibrator.to_dict(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CascadeStage:
        return cls(
            name=d["name"],
            kind=d["kind"],
            file=d["file"],
            cost_ms=float(d["cost_ms"]),
            calibrator=None if d.get("calibrator") is None else calibrator_from_dict(d["calibrator"]),
            flops=d.get("flops"),
            info=dict(d.get("info", {})),
        )


@dataclass
class Cascade:
    """An ordered list of stages (cheapest first) and one certified gate ``threshold`` λ: a row stops at the first
    stage whose calibrated confidence reaches λ, and the last stage answers the rest. ``certified`` says whether
    the selective risk ``target`` holds at confidence ``1 - delta`` (``bound_pvalue`` ≤ ``delta``) on the
    ``n_calib`` calibration rows; round-trips through :meth:`to_dict`/:meth:`from_dict`."""

    stages: list[CascadeStage]
    threshold: float  # λ: the gate of every stage but the last; +inf sends everything to the last stage
    mode: Mode
    target: float
    delta: float
    certified: bool
    bound_pvalue: float  # p-value of the chosen λ (≤ delta when certified)
    calib_risk: float  # empirical risk of the chosen λ on the calibration rows
    n_calib: int
    tests: int = (
        1  # candidate subsets of stages tested (select_cascade): each at delta / tests, a union bound
    )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def expected_cost(self, stage: np.ndarray) -> float:
        """Mean ms per image when row i stops at ``stage[i]`` (every earlier stage ran too)."""
        cost = np.cumsum([s.cost_ms for s in self.stages])
        return float(cost[stage].mean()) if len(stage) else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "stages": [s.to_dict() for s in self.stages],
            "threshold": threshold_to_json(self.threshold),
            "early_exit": math.isfinite(self.threshold),  # false: every image goes to the last stage
            "mode": self.mode,
            "target": self.target,
            "delta": self.delta,
            "certified": self.certified,
            "bound_pvalue": self.bound_pvalue,
            "calib_risk": self.calib_risk,
            "n_calib": self.n_calib,
            "tests": self.tests,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cascade:
        return cls(
            stages=[CascadeStage.from_dict(s) for s in d["stages"]],
            threshold=threshold_from_json(d["threshold"]),
            mode=d["mode"],
            target=float(d["target"]),
            delta=float(d["delta"]),
            certified=bool(d["certified"]),
            bound_pvalue=float(d["bound_pvalue"]),
            calib_risk=float(d["calib_risk"]),
            n_calib=int(d["n_calib"]),
            tests=int(d.get("tests", 1)),
        )


def route(confidences: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """The stage that answers each row: the first early stage whose confidence ≥ ``threshold``, else the last.
    ``confidences``: one (n,) array per early stage (the last stage needs none)."""
    n = len(confidences[0]) if len(confidences) else 0
    stage = np.full(n, len(confidences), dtype=np.intp)
    undecided = np.ones(n, dtype=bool)
    for s, c in enumerate(confidences):
        hit = undecided & (c >= threshold)
        stage[hit] = s
        undecided &= ~hit
    return stage


def gate_grid(floor: float, m: int = 60) -> np.ndarray:
    """Gate thresholds from strict to loose: 1 − geometric steps down to ``floor``, dense near 1."""
    floor = min(max(floor, 0.0), 1 - 1e-6)
    return 1.0 - np.geomspace(1e-5, 1.0 - floor, m)


def _losses(stage: np.ndarray, preds: Sequence[np.ndarray], labels: np.ndarray, mode: Mode) -> np.ndarray:
    answer = np.choose(stage, preds) if len(preds) > 1 else preds[0]
    wrong = answer != labels
    return wrong & (preds[-1] == labels) if mode == "match" else wrong


def _pvalue(errors: int, n: int, target: float) -> float:
    return float(binomial_pvalue(errors, n, target))


def _exit_scores(probs: Sequence[np.ndarray], scores: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
    """What each earlier stage's gate compares with λ: a learned gate's score, else calibrated confidence."""
    return [
        p.max(axis=1) if scores is None or scores[s] is None else np.asarray(scores[s], np.float64)
        for s, p in enumerate(probs[:-1])
    ]


def cascade_curve(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    costs: Sequence[float],
    grid: np.ndarray,
    mode: Mode = "match",
    scores: Sequence[np.ndarray | None] | None = None,
) -> dict[str, np.ndarray]:
    """For every gate threshold of ``grid``: mean cost, accuracy, risk (per ``mode``) and each stage's share.
    ``scores``: per stage, a learned gate's P(answer here), or None to gate on calibrated confidence."""
    confs = _exit_scores(probs, scores)
    preds = [p.argmax(axis=1) for p in probs]
    cum = np.cumsum(costs)
    rows: dict[str, list[Any]] = {"threshold": [], "cost_ms": [], "accuracy": [], "risk": [], "share": []}
    for lam in grid:
        stage = route(confs, float(lam))
        answer = np.choose(stage, preds)
        rows["threshold"].append(lam)
        rows["cost_ms"].append(cum[stage].mean())
        rows["accuracy"].append((answer == labels).mean())
        rows["risk"].append(_losses(stage, preds, labels, mode).mean())
        rows["share"].append(np.bincount(stage, minlength=len(probs)) / max(len(stage), 1))
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def fit_cascade(
    stages: Sequence[CascadeStage],
    probs: Sequence[np.ndarray],
    labels: object,
    *,
    mode: Mode = "match",
    target: float = 0.005,
    delta: float = 0.05,
    floor: float = 0.5,
    grid_size: int = 60,
    scores: Sequence[np.ndarray | None] | None = None,
) -> Cascade:
    """Certify the gate threshold on calibration rows: ``probs[s]`` is stage s's calibrated (n, K)
    probabilities (the last stage's through the policy's calibrator), in cascade order; ``scores`` as in
    :func:`cascade_curve`."""
    if len(stages) != len(probs) or len(stages) < 2:
        raise InputError(
            f"fit_cascade needs one probability matrix per stage and at least two stages; got {len(stages)} "
            f"stages and {len(probs)} matrices."
        )
    if mode not in ("risk", "match"):
        raise InputError(f"cascade mode {mode!r} is unknown; use 'risk' or 'match'.")
    target = check_level(target, "target", "fit_cascade")
    delta = check_level(delta, "delta", "fit_cascade")
    n, k = probs[-1].shape
    for s, p in zip(stages, probs, strict=True):
        if p.shape != (n, k):
            raise InputError(f"stage {s.name!r} probabilities have shape {p.shape}; expected {(n, k)}.")
    y = check_labels(labels, n, k, "fit_cascade")
    confs = _exit_scores(probs, scores)
    preds = [p.argmax(axis=1) for p in probs]
    chosen, p_chosen, risk_chosen = math.inf, math.nan, math.nan
    last = np.full(n, len(stages) - 1)
    base = _losses(last, preds, y, mode)
    for lam in gate_grid(floor, grid_size):
        losses = _losses(route(confs, float(lam)), preds, y, mode)
        pv = _pvalue(int(losses.sum()), n, target)
        if pv > delta:
            break
        chosen, p_chosen, risk_chosen = float(lam), pv, float(losses.mean())
    certified = math.isfinite(chosen)
    if not certified:
        p_chosen, risk_chosen = _pvalue(int(base.sum()), n, target), float(base.mean())
        warnings.warn(
            f"no cascade gate could be certified at {mode} ≤ {target:g} with δ={delta:g} on {n} calibration rows "
            f"(the strictest gate already fails); every image goes to the last stage. Raise cascade.target or "
            "add calibration images.",
            RoadworkWarning,
            stacklevel=2,
        )
    return Cascade(
        stages=list(stages),
        threshold=chosen,
        mode=mode,
        target=target,
        delta=delta,
        certified=certified,
        bound_pvalue=p_chosen,
        calib_risk=risk_chosen,
        n_calib=n,
    )


def run_cascade(
    cascade: Cascade,
    stage_probs: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]],
    n: int,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a cascade batch-wise: ``stage_probs(s, rows)`` returns stage s's calibrated probabilities and exit
    scores for the given row indices, and is called only for the rows that reach stage s. Returns (probs,
    stage)."""
    probs = np.zeros((n, n_classes))
    stage = np.full(n, len(cascade.stages) - 1, dtype=np.intp)
    rows = np.arange(n)
    for s in range(len(cascade.stages) - 1):
        if not len(rows):
            break
        p, score = stage_probs(s, rows)
        done = score >= cascade.threshold
        probs[rows[done]] = p[done]
        stage[rows[done]] = s
        rows = rows[~done]
    if len(rows):
        probs[rows] = stage_probs(len(cascade.stages) - 1, rows)[0]
    return probs, stage


def select_cascade(
    stages: Sequence[CascadeStage],
    probs: Sequence[np.ndarray],
    labels: object,
    *,
    mode: Mode = "match",
    target: float = 0.005,
    delta: float = 0.05,
    floor: float = 0.5,
    grid_size: int = 60,
    scores: Sequence[np.ndarray | None] | None = None,
) -> tuple[Cascade, list[dict[str, Any]]]:
    """Certify every subset of the earlier stages at δ/m and keep the cheapest on the calibration rows (see the
    module docstring). Returns it and one row per candidate (stages, gate, certified, mean cost)."""
    import itertools

    early = list(range(len(stages) - 1))
    subsets = [c for r in range(len(early), 0, -1) for c in itertools.combinations(early, r)]
    m = len(subsets)
    last = len(stages) - 1
    y = np.asarray(labels)
    alone_cost = stages[last].cost_ms
    candidates: list[dict[str, Any]] = [
        {"stages": [stages[last].name], "threshold": math.inf, "certified": True, "calib_cost_ms": alone_cost}
    ]
    best: tuple[float, Cascade | None] = (alone_cost, None)
    for subset in subsets:
        idx = [*subset, last]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoadworkWarning)
            c = fit_cascade(
                [stages[i] for i in idx],
                [probs[i] for i in idx],
                y,
                mode=mode,
                target=target,
                delta=delta / m,
                floor=floor,
                grid_size=grid_size,
                scores=None if scores is None else [scores[i] for i in idx],
            )
        confs = _exit_scores([probs[i] for i in idx], None if scores is None else [scores[i] for i in idx])
        stage = route(confs, c.threshold)
        cost = c.expected_cost(stage)
        candidates.append(
            {"stages": c.names, "threshold": c.threshold, "certified": c.certified, "calib_cost_ms": cost}
        )
        if c.certified and cost < best[0]:
            best = (cost, c)
    chosen = best[1]
    if chosen is None:  # nothing beats the model alone: a cascade of one stage (every image to the model)
        # what was measured for it: the model alone's risk on these rows (0 in match mode by definition)
        preds = probs[last].argmax(axis=1)
        losses = _losses(np.zeros(len(y), dtype=np.intp), [preds], y, mode)
        chosen = Cascade(
            stages=[stages[last]],
            threshold=math.inf,
            mode=mode,
            target=target,
            delta=delta,
            certified=bool(_pvalue(int(losses.sum()), len(y), target) <= delta),
            bound_pvalue=_pvalue(int(losses.sum()), len(y), target),
            calib_risk=float(losses.mean()) if len(y) else 0.0,
            n_calib=len(y),
        )
    chosen.delta = delta  # the family-wise level; each candidate was tested at delta / m
    chosen.tests = m  # whoever re-certifies this gate (a model variant) must test it at delta / m too
    for row in candidates:
        row["chosen"] = row["stages"] == chosen.names
    return chosen, candidates
