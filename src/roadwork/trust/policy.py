"""``TrustPolicy``: everything after the network, in numpy, serialised to JSON.

[cascade gates →] calibrate → prediction set → abstain → decision. The evaluator, the Python API, ``roadwork predict``
and the bundle all call :meth:`TrustPolicy.apply`, so offline metrics are the metrics of what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roadwork.errors import ArtifactError, InputError
from roadwork.jsonio import dumps, parse_artifact
from roadwork.trust._checks import check_logits
from roadwork.trust.calibration import Calibrator, SliceCalibrator, calibrate_proba, calibrator_from_dict
from roadwork.trust.cascade import Cascade, run_cascade
from roadwork.trust.conformal import SplitConformal
from roadwork.trust.operating import OperatingPoint, decide
from roadwork.trust.risk import FalseNegativeControl
from roadwork.trust.selective import AbstentionCertificate

__all__ = ["POLICY_SCHEMA", "PolicyOutput", "TrustPolicy", "cascade_probs", "concat_outputs"]

POLICY_SCHEMA = 1
"""Version of ``policy.json``'s layout (docs/reference/policy.schema.json); bumped when it changes."""
_NO_GROUP = "\x00no-group"  # rows whose request lacks the group column: never a calibration group → global


@dataclass
class PolicyOutput:
    """What the policy decides for ``n`` rows: calibrated probabilities, prediction, confidence, conformal sets,
    abstain flags, and (binary tasks, cascades, risk control) the score, stage and flags. Shapes per field."""

    probs: np.ndarray  # (n, K) calibrated probabilities, float64
    pred: np.ndarray  # (n,) argmax class index
    confidence: np.ndarray  # (n,) max calibrated probability
    sets: np.ndarray  # (n, K) bool conformal prediction sets
    abstain: np.ndarray  # (n,) bool: confidence below the certified threshold
    score: np.ndarray | None = None  # (n,) binary tasks: positive-class score, 0.5 is the operating point
    positive_possible: np.ndarray | None = (
        None  # (n,) bool: risk control says the positive can't be ruled out
    )
    stage: np.ndarray | None = None  # (n,) index of the cascade stage that answered
    stage_names: list[str] | None = None

    def records(self, classes: list[str]) -> list[dict[str, Any]]:
        """One JSON-ready dict per row (what ``roadwork predict`` prints and the server returns)."""
        out = []
        for i in range(len(self.pred)):
            rec: dict[str, Any] = {
                "label": classes[self.pred[i]],
                "probability": round(float(self.confidence[i]), 6),
                "prediction_set": [classes[k] for k in np.flatnonzero(self.sets[i])],
                "abstain": bool(self.abstain[i]),
            }
            if self.score is not None:  # StreetVision-style binary score in [0, 1]; 0.5 decides
                s = round(float(self.score[i]), 6)
                # a score just under 0.5 must not print as 0.5: a client rounding the JSON decides as label does
                rec["score"] = 0.499999 if s >= 0.5 > self.score[i] else s
            if self.positive_possible is not None:
                rec["positive_possible"] = bool(self.positive_possible[i])
            if self.stage is not None and self.stage_names is not None:
                rec["stage"] = self.stage_names[self.stage[i]]
            out.append(rec)
        return out


def cascade_probs(
    cascade: Cascade,
    calibrator: Calibrator,
    n_classes: int,
    stage_logits: Callable[[int, np.ndarray], object],
    n: int,
    slices: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's calibrated probabilities and the stage that answered each row: earlier stages through
    their own calibrators (a learned gate's extra output is its exit score), the last (the model) through
    ``calibrator``. ``stage_logits(s, rows)`` is called only for the rows that reach stage s."""
    last = len(cascade.stages) - 1

    def stage_probs(s: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        st = cascade.stages[s]
        z = check_logits(stage_logits(s, rows), f"cascade stage {st.name!r}")
        if s == last:
            sub = None if slices is None else {key: np.asarray(v)[rows] for key, v in slices.items()}
            p = calibrate_proba(calibrator, z, sub)
            return p, p.max(axis=1)
        if st.calibrator is None:
            raise InputError(f"cascade stage {st.name!r} has no calibrator; re-run the cascade stage.")
        if st.info.get("gate"):  # a learned deferral gate: the extra last output, P(answer here)
            return st.calibrator.predict_proba(z[:, :n_classes]), 1 / (1 + np.exp(-z[:, n_classes]))
        p = st.calibrator.predict_proba(z)
        return p, p.max(axis=1)

    return run_cascade(cascade, stage_probs, n, n_classes)


def concat_outputs(parts: Sequence[PolicyOutput]) -> PolicyOutput:
    """Row-wise concatenation of policy outputs (of batches of one stream)."""
    if not parts:
        raise InputError("concat_outputs needs at least one PolicyOutput.")

    def cat(name: str) -> np.ndarray | None:
        vals = [getattr(p, name) for p in parts]
        return None if any(v is None for v in vals) else np.concatenate(vals)

    return PolicyOutput(
        probs=np.concatenate([p.probs for p in parts]),
        pred=np.concatenate([p.pred for p in parts]),
        confidence=np.concatenate([p.confidence for p in parts]),
        sets=np.concatenate([p.sets for p in parts]),
        abstain=np.concatenate([p.abstain for p in parts]),
        score=cat("score"),
        positive_possible=cat("positive_possible"),
        stage=cat("stage"),
        stage_names=parts[0].stage_names,
    )


@dataclass
class TrustPolicy:
    """Everything after the network, as one serialisable object: calibrator → conformal sets → certified
    abstention, optionally a binary operating point, false-negative risk control and a cascade. The evaluator,
    the Python API, the bundle and the server all call :meth:`apply` (or :meth:`apply_cascade`)."""

    classes: list[str]
    calibrator: Calibrator
    conformal: SplitConformal
    abstention: AbstentionCertificate
    positive_class: str | None = None  # for binary tasks: the class whose probability is the score
    operating_point: OperatingPoint | None = None  # remaps the score so the chosen threshold sits at 0.5
    risk_control: FalseNegativeControl | None = None  # flags images so E[missed positives] <= alpha
    cascade: Cascade | None = None  # earlier, cheaper stages and their certified gate; the model is the last

    def apply(self, logits: object, slices: Mapping[str, Any] | None = None) -> PolicyOutput:
        """``slices``: per-row metadata columns (e.g. ``{"weather": [...]}``). A per-slice calibrator and
        Mondrian-by-group sets read their column from it; rows without it get the global calibrator and
        threshold (the marginal guarantee only). ``logits`` are the model's (the cascade's last stage)."""
        z = check_logits(logits, "TrustPolicy.apply")
        return self._decide(calibrate_proba(self.calibrator, z, slices), slices)

    def apply_cascade(
        self,
        stage_logits: Callable[[int, np.ndarray], object],
        n: int,
        slices: Mapping[str, Any] | None = None,
    ) -> PolicyOutput:
        """Run the cascade: ``stage_logits(s, rows)`` returns stage s's logits for those row indices and is
        called only for rows that reach stage s (the last stage is the model :meth:`apply` calibrates)."""
        if self.cascade is None:
            raise InputError(
                "this policy has no cascade; call apply(logits) or export with cascade.enabled=true."
            )
        probs, stage = cascade_probs(
            self.cascade, self.calibrator, len(self.classes), stage_logits, n, slices
        )
        out = self._decide(probs, slices)
        out.stage, out.stage_names = stage, self.cascade.names
        return out

    def _decide(self, probs: np.ndarray, slices: Mapping[str, Any] | None) -> PolicyOutput:
        def column(name: str | None) -> np.ndarray:
            col = None if slices is None or not name else slices.get(name)
            return np.full(len(probs), _NO_GROUP) if col is None else np.asarray(col)

        groups = column(self.conformal.group_by) if self.conformal.mondrian == "group" else None
        pred, conf = self.decision(probs)
        fnr = self.risk_control
        score = None
        if self.positive_index is not None:
            score = probs[:, self.positive_index]
            if self.operating_point is not None:
                score = self.operating_point.remap(score)
        return PolicyOutput(
            probs=probs,
            pred=pred,
            confidence=conf,
            sets=self.conformal.predict_sets(probs, groups=groups),
            abstain=conf < self.abstention.thresholds(column(self.abstention.group_by), len(probs)),
            score=score,
            positive_possible=None if fnr is None else fnr.predict(probs, column(fnr.group_by)),
        )

    def decision(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pred, confidence)`` on calibrated probabilities: the operating point's decision when there is one
        (:func:`~roadwork.trust.operating.decide`), else the argmax and its probability. Abstention is certified
        on exactly this (see :func:`~roadwork.pipeline.certify.fit_abstention`)."""
        if self.operating_point is not None and self.positive_index is not None:
            return decide(probs, self.positive_index, self.operating_point.threshold)
        return probs.argmax(axis=1), probs.max(axis=1)

    @property
    def slice_columns(self) -> list[str]:
        """Metadata columns this policy uses when a request carries them."""
        cols = [self.calibrator.column] if isinstance(self.calibrator, SliceCalibrator) else []
        if self.conformal.mondrian == "group" and self.conformal.group_by:
            cols.append(self.conformal.group_by)
        if self.abstention.group_by:
            cols.append(self.abstention.group_by)
        if self.risk_control is not None and self.risk_control.group_by:
            cols.append(self.risk_control.group_by)
        return sorted(set(cols))

    @property
    def positive_index(self) -> int | None:
        return None if self.positive_class is None else self.classes.index(self.positive_class)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": POLICY_SCHEMA,
            "classes": self.classes,
            "positive_class": self.positive_class,
            "calibrator": self.calibrator.to_dict(),
            "conformal": self.conformal.to_dict(),
            "abstention": self.abstention.to_dict(),
            "operating_point": None if self.operating_point is None else self.operating_point.to_dict(),
            "risk_control": None if self.risk_control is None else self.risk_control.to_dict(),
            "cascade": None if self.cascade is None else self.cascade.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrustPolicy:
        if d.get("schema") != POLICY_SCHEMA:
            raise ArtifactError(
                f"policy schema {d.get('schema')!r} is not {POLICY_SCHEMA}; re-export the bundle "
                "with this roadwork version."
            )
        c, positive = d["classes"], d.get("positive_class")
        if not (isinstance(c, list) and c and all(isinstance(n, str) for n in c) and len(set(c)) == len(c)):
            raise ArtifactError(
                f"its 'classes' is {str(c)[:80]!r}, not a list of class names (non-empty, distinct)"
            )
        if positive is not None and not (isinstance(positive, str) and positive in c):
            raise ArtifactError(f"its 'positive_class' is {str(positive)[:40]!r}, not one of its classes")
        return cls(
            classes=list(c),
            calibrator=calibrator_from_dict(d["calibrator"]),
            conformal=SplitConformal.from_dict(d["conformal"]),
            abstention=AbstentionCertificate.from_dict(d["abstention"]),
            positive_class=d.get("positive_class"),
            risk_control=None
            if d.get("risk_control") is None
            else FalseNegativeControl.from_dict(d["risk_control"]),
            operating_point=None
            if d.get("operating_point") is None
            else OperatingPoint.from_dict(d["operating_point"]),
            cascade=None if d.get("cascade") is None else Cascade.from_dict(d["cascade"]),
        )

    def to_json(self) -> str:
        """Strict JSON (no NaN/Infinity: an unbounded threshold is null, see docs/reference/policy.schema.json)."""
        return dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "policy JSON") -> TrustPolicy:
        """The policy :meth:`to_json` wrote. Anything else (not JSON, nested too deeply, not an object, a field
        missing or of the wrong type) is an :class:`ArtifactError` naming ``where`` (the file it came from)."""
        return parse_artifact(
            text,
            cls.from_dict,
            where=where,
            what="policy",
            fix="Re-export the bundle (or rerun the policy stage) with this roadwork version.",
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> TrustPolicy:
        """:meth:`from_json` of a file; an unreadable or malformed one is an :class:`ArtifactError` naming it."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ArtifactError(f"Could not read policy {str(path)!r}: {e.strerror or e}.") from None
        return cls.from_json(data, where=str(path))
