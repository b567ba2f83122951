"""Certify what is served: the trust layer fitted on the outputs of the path the bundle runs.

The served path is ``[cascade stages →] model → calibrator → conformal set, abstention, risk control``. With a
cascade, the image is answered by whichever stage exits first, so the prediction set, the abstain decision
and the miss-rate flag must be certified on those *composite* outputs, not on the model's alone. The
construction (one calibration split, disjoint rows for every data-dependent choice):

1. **calibrator rows** (``calibrate.fit_fraction``, a stable hash of the image id): the model's calibrator and
   each earlier stage's calibrator. (For temperature scaling, one parameter, all rows are shared by default.)
2. The remaining **trust rows** are split once more when there is a cascade (``cascade.gate_fraction``, another
   stable hash): the **gate rows** choose and certify the exit gate (and which stages to keep), the **policy
   rows** then fit the conformal threshold, the certified abstention threshold and the miss-rate control on
   the composite calibrated probabilities of the cascade that was chosen. The gate is a function of the gate
   rows only, so on the policy rows the composite score is a fixed function of ``(x, y)`` and every guarantee
   of the split-conformal / Learn-then-Test / risk-control theory holds for the served outputs unchanged.

The cost is split size: the gate and the thresholds each see about half of the trust rows. Without a cascade
nothing is split further. Every variant of the model (fp32, int8) is certified on its own outputs through
:func:`certify_served` (the same steps the pipeline's stages run one by one).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from roadwork.config import (
    CalibrateConfig,
    CascadeConfig,
    ConformalConfig,
    PolicyConfig,
    RunConfig,
    SelectiveConfig,
)
from roadwork.errors import ConfigError, RoadworkWarning
from roadwork.trust import Predictions, SplitConformal, TrustPolicy, certify_abstention, make_calibrator
from roadwork.trust.calibration import Calibrator, SliceCalibrator
from roadwork.trust.cascade import Cascade, CascadeStage, fit_cascade, select_cascade
from roadwork.trust.operating import OperatingPoint, decide, fit_operating_point
from roadwork.trust.policy import cascade_probs
from roadwork.trust.risk import FalseNegativeControl
from roadwork.trust.selective import AbstentionCertificate, rows_needed

__all__ = [
    "RowSplit",
    "abstention_warnings",
    "certify_gate",
    "certify_served",
    "check_policy_classes",
    "fit_abstention",
    "fit_calibrator",
    "fit_conformal",
    "fit_fraction",
    "fit_operating_point_of",
    "fit_risk",
    "flip_to_noise",
    "positive_class",
    "row_split",
    "served_decision",
    "served_probs",
    "slice_column",
]


def _hash_below(ids: np.ndarray, salt: str, fraction: float) -> np.ndarray:
    if fraction >= 1:
        return np.ones(len(ids), dtype=bool)
    u = np.array([int(hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:15], 16) for i in ids]) / 16**15
    return u < fraction


@dataclass(frozen=True)
class RowSplit:
    """Boolean masks over the calibration split's rows (see the module docstring)."""

    calibrator: np.ndarray
    gate: np.ndarray
    policy: np.ndarray

    def counts(self) -> dict[str, int]:
        """How many rows each part holds."""
        return {k: int(getattr(self, k).sum()) for k in ("calibrator", "gate", "policy")}


def row_split(ids: np.ndarray, fit_fraction: float, gate_fraction: float | None) -> RowSplit:
    """``fit_fraction`` of the rows fit calibrators (1: all rows, shared); of the rest (or all, when shared),
    ``gate_fraction`` certify a cascade's gate (None: no cascade) and the others the policy's thresholds."""
    fit = _hash_below(ids, "calibrator", fit_fraction)
    trust = fit if fit_fraction >= 1 else ~fit
    if gate_fraction is None:
        return RowSplit(fit, np.zeros(len(ids), dtype=bool), trust)
    gate = trust & _hash_below(ids, "gate", gate_fraction)
    return RowSplit(fit, gate, trust & ~gate)


def slice_column(p: Predictions, column: str, key: str) -> np.ndarray:
    """A slice column of ``p``; a ConfigError naming ``key`` when the dataset has no such column."""
    if column not in p.slices:
        raise ConfigError(
            f"{key}={column!r} is not a slice column of this dataset; it has "
            f"{', '.join(sorted(p.slices)) or 'none'}. Set {key} to one of those (or null)."
        )
    return p.slices[column]


def fit_calibrator(c: CalibrateConfig, fit: Predictions) -> Calibrator:
    """The model's calibrator on the calibrator rows (per slice when ``calibrate.per_slice`` is set)."""
    if c.per_slice:
        groups = slice_column(fit, c.per_slice, "calibrate.per_slice")
        return SliceCalibrator(c.method, c.per_slice, min_count=c.min_slice_count).fit(
            fit.logits, fit.labels, groups
        )
    return make_calibrator(c.method).fit(fit.logits, fit.labels)


def certify_gate(
    c: CascadeConfig,
    stages: Sequence[CascadeStage],
    probs: Sequence[np.ndarray],
    scores: Sequence[np.ndarray | None],
    labels: np.ndarray,
) -> tuple[Cascade, list[dict[str, Any]]]:
    """Certify the exit gate (and, with ``select_stages``, which earlier stages to keep) on the gate rows:
    ``probs[s]`` is stage s's calibrated probabilities, the model's last."""
    kw: dict[str, Any] = {
        "mode": c.mode,
        "target": c.target,
        "delta": c.delta,
        "floor": 0.5,
        "scores": scores,
    }
    if c.select_stages:
        return select_cascade(stages, probs, labels, **kw)
    return fit_cascade(stages, probs, labels, **kw), []


def served_probs(
    calibrator: Calibrator,
    cascade: Cascade | None,
    early: Sequence[np.ndarray],
    model_logits: np.ndarray,
    slices: dict[str, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Calibrated probabilities of the served path on stored outputs (``early[s]``: stage s's outputs as its
    model emits them, for the stages of ``cascade``) and the stage that answered each row (None: no cascade)."""
    from roadwork.trust.calibration import calibrate_proba

    if cascade is None or len(cascade.stages) < 2:
        return calibrate_proba(calibrator, model_logits, slices), None
    outs = [*early, model_logits]
    return cascade_probs(
        cascade, calibrator, model_logits.shape[1], lambda s, r: outs[s][r], len(model_logits), slices
    )


def flip_to_noise(c: ConformalConfig, n_classes: int) -> float:
    """The label-noise rate ε of the conformal noise model: ``label_noise`` as given, or from the flip rate
    users know, ``ε = f K / (K - 1)`` (a flipped label moves to one of the other K-1 classes uniformly)."""
    if c.label_flip_rate:
        eps = c.label_flip_rate * n_classes / (n_classes - 1)
        if eps >= 1:
            raise ConfigError(
                f"conformal.label_flip_rate={c.label_flip_rate:g} with {n_classes} classes is ε = f·K/(K-1) = "
                f"{eps:.3f} ≥ 1: the labels would carry no information. Pass a flip rate below {(n_classes - 1) / n_classes:.3f}."
            )
        return eps
    return c.label_noise


def fit_conformal(c: ConformalConfig, probs: np.ndarray, cal: Predictions) -> SplitConformal:
    """The conformal threshold(s) on the policy rows' served probabilities."""
    return SplitConformal(
        alpha=c.alpha,
        score=c.method,
        randomized=c.randomized,
        mondrian=None if c.mondrian == "none" else c.mondrian,
        allow_empty=c.allow_empty,
        label_noise=flip_to_noise(c, cal.n_classes),
        group_by=c.group_by,
    ).fit(probs, cal.labels, slice_column(cal, c.group_by, "conformal.group_by") if c.group_by else None)


def fit_abstention(
    s: SelectiveConfig,
    probs: np.ndarray,
    cal: Predictions,
    op: OperatingPoint | None = None,
    positive: str | None = None,
) -> AbstentionCertificate:
    """The certified abstention threshold on the policy rows' served probabilities (per slice with group_by), for
    the decision the policy serves: the argmax, or the operating point ``op``'s (binary; see
    :func:`~roadwork.trust.operating.decide`)."""
    groups = slice_column(cal, s.group_by, "selective.group_by") if s.group_by else None
    pred, conf = served_decision(probs, cal.classes, op, positive)
    return certify_abstention(
        conf,
        pred == cal.labels,
        target_risk=s.target_risk,
        delta=s.delta,
        n_classes=cal.n_classes,
        method=s.method,
        groups=groups,
        group_by=s.group_by,
        min_count=s.min_group_count,
    )


def served_decision(
    probs: np.ndarray, classes: list[str], op: OperatingPoint | None, positive: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, confidence)`` as the served policy decides (:meth:`TrustPolicy.decision`): the operating point's
    decision when there is one, else the argmax."""
    if op is None:
        return probs.argmax(axis=1), probs.max(axis=1)
    return decide(probs, classes.index(positive or positive_class(classes) or classes[1]), op.threshold)


def positive_class(classes: list[str], chosen: str | None = None) -> str | None:
    """Binary tasks: the class whose probability is the score: ``chosen`` (``policy.positive_class``) when given,
    else ``roadwork`` for the flagship task, else the alphabetically second class; None with more classes."""
    if chosen is not None:
        if chosen not in classes or len(classes) != 2:
            raise ConfigError(
                f"policy.positive_class={chosen!r} is not one of this binary task's classes {classes}; set it to "
                "one of them, or null for the default."
            )
        return chosen
    if classes == ["no_roadwork", "roadwork"]:
        return "roadwork"
    return classes[1] if len(classes) == 2 else None


def fit_operating_point_of(pc: PolicyConfig, probs: np.ndarray, cal: Predictions) -> OperatingPoint | None:
    """``policy.operating_point`` fitted on these rows' served probabilities (None when it is ``none``)."""
    if pc.operating_point == "none":
        return None
    positive = positive_class(cal.classes, pc.positive_class)
    if positive is None:
        raise ConfigError(
            f"policy.operating_point needs two classes; this task has {cal.n_classes}. Set "
            "policy.operating_point=none."
        )
    k = cal.classes.index(positive)
    return fit_operating_point(probs[:, k], cal.labels == k, criterion=pc.operating_point, target=pc.target)


def check_policy_classes(pc: PolicyConfig, classes: list[str]) -> str | None:
    """The positive class the policy keys need (``policy.*`` against the data's classes), or a
    :class:`ConfigError` naming the key, the value and the fix: called as soon as the classes are known, before
    training, and again where the policy is fitted."""
    positive = positive_class(classes, pc.positive_class)
    if positive is None and (pc.operating_point != "none" or pc.max_miss_rate is not None):
        raise ConfigError(
            f"policy.operating_point and policy.max_miss_rate need two classes; this task has {len(classes)}. "
            "Set policy.operating_point=none and policy.max_miss_rate=null."
        )
    return positive


def fit_risk(
    pc: PolicyConfig, probs: np.ndarray, cal: Predictions
) -> tuple[OperatingPoint | None, FalseNegativeControl | None]:
    """The operating point and the miss-rate control on the policy rows' served probabilities."""
    positive = check_policy_classes(pc, cal.classes)
    op, fnr = None, None
    if positive is not None and pc.max_miss_rate is not None:
        groups = slice_column(cal, pc.group_by, "policy.group_by") if pc.group_by else None
        fnr = FalseNegativeControl(
            alpha=pc.max_miss_rate,
            positive=cal.classes.index(positive),
            group_by=pc.group_by,
            min_count=pc.min_group_count,
        ).fit(probs, cal.labels, groups)
    op = fit_operating_point_of(pc, probs, cal)
    return op, fnr


def certify_served(
    cfg: RunConfig,
    calib: Predictions,
    *,
    cascade: Cascade | None = None,
    early: Sequence[np.ndarray] = (),
    recertify_gate: bool = True,
) -> tuple[TrustPolicy, dict[str, Any]]:
    """The whole chain for one variant of the model: ``calib`` holds its logits on the calibration split;
    ``cascade`` the earlier stages (with their calibrators) and ``early`` their stored outputs on the same
    rows. The gate is re-certified on the gate rows for this model (``recertify_gate``), keeping the stages.
    Returns the policy and a report (row counts, warnings)."""
    split = row_split(
        calib.ids, fit_fraction(cfg), cfg.cascade.gate_fraction if cascade is not None else None
    )
    calibrator = fit_calibrator(cfg.calibrate, calib.subset(split.calibrator))
    if cascade is not None:  # earlier stages without a calibrator get one on the calibrator rows
        for st, z in zip(cascade.stages, early, strict=False):
            if st.calibrator is None:
                st.calibrator = make_calibrator(cfg.calibrate.method).fit(
                    z[split.calibrator][:, : calib.n_classes], calib.labels[split.calibrator]
                )
    if cascade is not None and recertify_gate and len(cascade.stages) > 1:
        from roadwork.trust.calibration import calibrate_proba

        k = calib.n_classes
        gate = calib.subset(split.gate)
        refit_tests = cascade.tests
        probs = [
            st.calibrator.predict_proba(z[split.gate][:, :k])  # type: ignore[union-attr]
            for st, z in zip(cascade.stages, early, strict=False)
        ]
        scores: list[np.ndarray | None] = [
            1 / (1 + np.exp(-z[split.gate][:, k])) if st.info.get("gate") else None
            for st, z in zip(cascade.stages, early, strict=False)
        ]
        probs.append(calibrate_proba(calibrator, gate.logits, gate.slices))
        scores.append(None)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", RoadworkWarning)
            cascade = fit_cascade(
                cascade.stages,
                probs,
                gate.labels,
                mode=cascade.mode,
                target=cascade.target,
                delta=cascade.delta / cascade.tests,  # the level its stages were chosen at (union bound)
                floor=0.5,
                scores=scores,
            )
        cascade.delta, cascade.tests = cascade.delta * refit_tests, refit_tests  # family-wise, as chosen
    pol = calib.subset(split.policy)
    probs_pol, _ = served_probs(calibrator, cascade, [z[split.policy] for z in early], pol.logits, pol.slices)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoadworkWarning)
        conformal = fit_conformal(cfg.conformal, probs_pol, pol)
        op, fnr = fit_risk(cfg.policy, probs_pol, pol)
        positive = positive_class(calib.classes, cfg.policy.positive_class)
        abstention = fit_abstention(cfg.selective, probs_pol, pol, op, positive)  # for the decision served
    policy = TrustPolicy(
        classes=calib.classes,
        calibrator=calibrator,
        conformal=conformal,
        abstention=abstention,
        positive_class=positive_class(calib.classes, cfg.policy.positive_class),
        operating_point=op,
        risk_control=fnr,
        cascade=cascade if cascade is not None and len(cascade.stages) > 1 else None,
    )
    return policy, {"rows": split.counts(), "warnings": [str(w.message) for w in caught]}


def fit_fraction(cfg: RunConfig) -> float:
    """Share of the calibration split that fits calibrators (see ``calibrate.fit_fraction``)."""
    c = cfg.calibrate
    if c.fit_fraction is not None:
        return c.fit_fraction
    shared = c.method in ("none", "temperature") and not c.per_slice  # ≤ 1 parameter: share all rows
    return 1.0 if shared else 0.3


def abstention_warnings(
    cert: AbstentionCertificate, confidence: np.ndarray, correct: np.ndarray, n_classes: int
) -> list[str]:
    """Advice when the certificate answers nothing or the split is too small for its target, with the smallest
    target these rows could support (``confidence``/``correct``: the served decision's on the policy rows)."""
    from roadwork.trust.selective import smallest_certifiable_risk

    out = []
    n_rows = len(correct)
    need = rows_needed(cert.target_risk, cert.delta)
    lowest, share = smallest_certifiable_risk(
        confidence,
        correct,
        cert.delta,
        n_classes=n_classes,
        method=cert.method,  # type: ignore[arg-type]
    )
    if cert.answers == "none":
        out.append(
            f"Certified abstention answers 0 % of images: no confidence threshold certifies selective risk ≤ "
            f"{cert.target_risk:g} at δ={cert.delta:g} on {n_rows} calibration rows, so the bundle abstains on "
            "every image. "
            + (
                f"The smallest target {cert.method} certifies on these rows is {lowest:g} (answering {share:.0%} "
                f"of them): rerun with selective.target_risk={lowest:g} (the same name=, so only the trust stages "
                "rerun), "
                if lowest < 1
                else "No selective.target_risk up to 0.5 is certified on these rows: "
            )
            + "add labelled images (more calibration rows), or use a stronger model (pretrained weights: "
            "model.weights=FILE)."
        )
    if n_rows < need:
        out.append(
            f"The calibration rows that certify abstention ({n_rows}) are fewer than the {need} answered rows "
            f"selective.target_risk={cert.target_risk:g} needs at δ={cert.delta:g} even with zero errors; "
            f"add data or raise the target."
        )
    for value, g in cert.groups.items():
        if g.answers == "none":
            out.append(
                f"Certified abstention answers 0 % of images with {cert.group_by}={value}: raise "
                "selective.target_risk or add calibration images of that slice."
            )
    return out
