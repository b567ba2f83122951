"""The served path's guarantees, tested statistically on stored cascade outputs: over many random calibration /
test re-splits, the policy certified by :func:`certify_served` holds its targets on the test rows as served
(the cascade's composite outputs), within tolerances derived from the number of splits."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from roadwork.config import load_config
from roadwork.errors import ConfigError, RoadworkWarning
from roadwork.pipeline.certify import certify_served, flip_to_noise, row_split
from roadwork.trust import Predictions
from roadwork.trust.cascade import Cascade, CascadeStage

N_SPLITS = 300
ALPHA, TARGET_RISK, MISS, DELTA = 0.1, 0.04, 0.05, 0.05


def _pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored outputs of a two-stage cascade on a binary task: a weaker small net correlated with the model."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    sign = 2 * y - 1
    model = sign * rng.normal(2.2, 1.6, n)
    small = 0.7 * model + rng.normal(0, 1.4, n)
    as_logits = lambda m: np.stack([-m / 2, m / 2], axis=1)  # noqa: E731
    return y, as_logits(small), as_logits(model)


def _cascade() -> Cascade:
    stages = [
        CascadeStage("small", "network", "s.onnx", 0.1),
        CascadeStage("model", "network", "m.onnx", 1.0),
    ]
    return Cascade(stages, math.inf, "match", 0.02, DELTA, False, 1.0, 0.0, 0)


def test_served_guarantees_hold_over_random_resplits():
    cfg = load_config(
        "default",
        [
            f"conformal.alpha={ALPHA}",
            f"selective.target_risk={TARGET_RISK}",
            f"selective.delta={DELTA}",
            f"policy.max_miss_rate={MISS}",
            "cascade.target=0.02",
        ],
    )
    y, small, model = _pool(8000)
    ids = np.array([f"img{i}" for i in range(len(y))])
    classes = ["no_roadwork", "roadwork"]
    rng = np.random.default_rng(1)
    violations, coverage, miss, answered, early_share = [], [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        for _ in range(N_SPLITS):
            perm = rng.permutation(len(y))
            cal, test = perm[:3000], perm[3000:]
            calib = Predictions(ids[cal], y[cal], model[cal], classes, {})
            policy, report = certify_served(cfg, calib, cascade=_cascade(), early=[small[cal]])
            assert report["rows"]["gate"] + report["rows"]["policy"] == len(cal)
            outs = [small[test], model[test]]
            if policy.cascade is None:
                out = policy.apply(model[test])
            else:
                out = policy.apply_cascade(lambda s, r: outs[s][r], len(test))  # noqa: B023
                early_share.append(float((out.stage == 0).mean()))
            yt = y[test]
            ans = ~out.abstain
            risk = float((out.pred[ans] != yt[ans]).mean()) if ans.any() else 0.0
            violations.append(risk > TARGET_RISK)
            answered.append(float(ans.mean()))
            coverage.append(float(out.sets[np.arange(len(yt)), yt].mean()))
            flagged = out.positive_possible
            assert flagged is not None
            miss.append(float((~flagged[yt == 1]).mean()))
    # the certificate: P(selective risk > target) <= δ, plus three binomial standard errors of N_SPLITS draws
    tol = 3 * math.sqrt(DELTA * (1 - DELTA) / N_SPLITS)
    assert np.mean(violations) <= DELTA + tol
    # coverage and miss rate hold in expectation over calibration draws: their means, within 3 standard errors
    cov, fnr = np.array(coverage), np.array(miss)
    assert cov.mean() >= 1 - ALPHA - 3 * cov.std() / math.sqrt(N_SPLITS)
    assert fnr.mean() <= MISS + 3 * fnr.std() / math.sqrt(N_SPLITS)
    # and the served path really is a cascade that answers: the small net answers part, abstention answers a good part
    assert len(early_share) == N_SPLITS and 0.05 < np.mean(early_share) < 0.95
    assert np.mean(answered) > 0.3


def test_row_split_is_disjoint_and_stable():
    ids = np.array([f"x{i}" for i in range(2000)])
    a = row_split(ids, 0.3, 0.5)
    assert not (a.calibrator & (a.gate | a.policy)).any() and not (a.gate & a.policy).any()
    assert (a.calibrator | a.gate | a.policy).all()
    assert abs(a.calibrator.mean() - 0.3) < 0.05 and abs(a.gate.mean() - 0.35) < 0.05
    b = row_split(ids[::-1], 0.3, 0.5)  # the same image lands in the same part, whatever the order
    np.testing.assert_array_equal(a.gate, b.gate[::-1])
    shared = row_split(ids, 1.0, None)  # no cascade, calibrator shares all rows: every row fits the policy
    assert shared.calibrator.all() and shared.policy.all() and not shared.gate.any()


def test_label_flip_rate_is_converted_to_the_noise_model():
    cfg = load_config("default", ["conformal.label_flip_rate=0.1"]).conformal
    assert flip_to_noise(cfg, 7) == pytest.approx(0.1 * 7 / 6)
    assert flip_to_noise(cfg, 2) == pytest.approx(0.2)
    assert flip_to_noise(load_config("default", ["conformal.label_noise=0.05"]).conformal, 7) == 0.05
    with pytest.raises(ConfigError, match="not both"):
        load_config("default", ["conformal.label_noise=0.05", "conformal.label_flip_rate=0.05"])
    with pytest.raises(ConfigError, match="ε"):
        flip_to_noise(load_config("default", ["conformal.label_flip_rate=0.6"]).conformal, 2)


def test_flip_rate_removes_the_over_coverage_of_noisy_labels():
    """Calibration labels flipped at rate f to another class (7 classes): plain conformal over-covers clean test
    labels; label_flip_rate=f brings coverage back to 1 - α within tolerance."""
    from roadwork.pipeline.certify import fit_conformal

    rng = np.random.default_rng(3)
    k, n, f = 7, 4000, 0.1
    covs: dict[str, list[float]] = {"plain": [], "flip": []}
    for _ in range(40):
        z = rng.normal(0, 1, (2 * n, k))
        y = rng.integers(0, k, 2 * n)
        z[np.arange(2 * n), y] += 2.5
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        noisy = y.copy()
        flip = rng.random(n) < f
        noisy[:n][flip] = (y[:n][flip] + rng.integers(1, k, flip.sum())) % k
        cal = Predictions(np.arange(n).astype(str), noisy[:n], np.log(p[:n]), [str(i) for i in range(k)], {})
        for name, over in (("plain", []), ("flip", [f"conformal.label_flip_rate={f}"])):
            cfg = load_config("default", ["conformal.alpha=0.1", *over]).conformal
            sets = fit_conformal(cfg, p[:n], cal).predict_sets(p[n:])
            covs[name].append(float(sets[np.arange(n), y[n:]].mean()))
    plain, fixed = np.mean(covs["plain"]), np.mean(covs["flip"])
    assert plain > 0.91  # noisy calibration labels widen the sets
    assert abs(fixed - 0.9) < 0.006 and abs(fixed - 0.9) < abs(plain - 0.9) / 2


def test_a_separable_calibration_split_is_said_to_pin_probabilities():
    """Temperature scaling on a calibration split the model never gets wrong drives T towards 0: every calibrated
    probability becomes exactly 1.0. The calibrate stage warns when most rows are pinned (see _pinned_share)."""
    from roadwork.pipeline.stages import _pinned_share
    from roadwork.trust import Predictions, make_calibrator

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    margin = (2 * y - 1) * (3 + rng.random(200))  # always right, margins 3 to 4
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    fit = Predictions(np.array([f"r{i}" for i in range(200)]), y, logits, ["a", "b"])
    separable = make_calibrator("temperature").fit(logits, y)
    assert _pinned_share(separable, fit) > 0.5
    noisy = logits + rng.normal(scale=3, size=logits.shape)  # mistakes: a moderate temperature
    rough = Predictions(fit.ids, y, noisy, ["a", "b"])
    assert _pinned_share(make_calibrator("temperature").fit(noisy, y), rough) == 0


def test_a_variant_recertifies_the_gate_at_the_level_its_stages_were_chosen_at(monkeypatch):
    """select_cascade tested m subsets of stages, each at δ/m; a model variant re-certifying the gate on the same
    gate rows must test at δ/m too (at δ the union bound over the m candidates is lost)."""
    import roadwork.pipeline.certify as certify
    from roadwork.trust.cascade import fit_cascade, select_cascade

    y, small, model = _pool(2000)
    stages = [*_cascade().stages[:1], CascadeStage("mid", "network", "x.onnx", 0.5), _cascade().stages[1]]
    from roadwork.trust import softmax

    chosen, candidates = select_cascade(
        stages, [softmax(small), softmax(small), softmax(model)], y, delta=DELTA
    )
    assert chosen.tests == len(candidates) - 1 == 3 and chosen.delta == DELTA
    assert type(chosen).from_dict(chosen.to_dict()).tests == 3
    seen = []

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw["delta"])
        return fit_cascade(*a, **kw)

    monkeypatch.setattr(certify, "fit_cascade", spy)
    cascade = _cascade()
    cascade.tests = 3
    cfg = load_config("default", ["cascade.target=0.02"])
    ids = np.array([f"img{i}" for i in range(len(y))])
    calib = Predictions(ids, y, model, ["no_roadwork", "roadwork"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        policy, _ = certify_served(cfg, calib, cascade=cascade, early=[small])
    assert seen == [pytest.approx(DELTA / 3)]
    assert policy.cascade is not None and policy.cascade.delta == DELTA and policy.cascade.tests == 3


@pytest.mark.parametrize("point, target", [("recall", 0.95), ("precision", 0.95), ("max_mcc", 0.9)])
def test_the_operating_point_decision_is_the_certified_one(point, target):
    """With an operating point, `label` is the operating point's decision (score >= 0.5 exactly when label is the
    positive class) and abstention is certified for it: over 300 re-splits of stored outputs, its selective risk
    on answered test images exceeds the target in at most δ (+ 3 binomial standard errors) of them. Before, label
    stayed the argmax while the score moved: at recall 0.95 they disagreed on answered images and the score's
    decision had an error far above the target."""
    cfg = load_config(
        "default",
        [
            f"selective.target_risk={TARGET_RISK}",
            f"selective.delta={DELTA}",
            f"policy.operating_point={point}",
            f"policy.target={target}",
        ],
    )
    y, _, model = _pool(8000, seed=3)
    ids = np.array([f"img{i}" for i in range(len(y))])
    rng = np.random.default_rng(2)
    violations, answered = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        for _ in range(N_SPLITS):
            perm = rng.permutation(len(y))
            cal, test = perm[:2000], perm[2000:]
            calib = Predictions(ids[cal], y[cal], model[cal], ["no_roadwork", "roadwork"], {})
            policy, _ = certify_served(cfg, calib)
            out = policy.apply(model[test])
            assert policy.operating_point is not None and out.score is not None
            np.testing.assert_array_equal(out.score >= 0.5, out.pred == 1)  # one decision, two spellings
            ans = ~out.abstain
            yt = y[test]
            violations.append(bool(ans.any()) and float((out.pred[ans] != yt[ans]).mean()) > TARGET_RISK)
            answered.append(float(ans.mean()))
    tol = 3 * math.sqrt(DELTA * (1 - DELTA) / N_SPLITS)
    assert np.mean(violations) <= DELTA + tol
    assert np.mean(answered) > 0.2  # it answers: a guarantee about something


def test_the_documented_prediction_schema_names_the_decision():
    from roadwork.serve.schemas import Prediction

    fields = Prediction.model_fields
    assert "operating point's decision" in (fields["label"].description or "")
    assert "score >= 0.5 exactly when label is the positive class" in (fields["score"].description or "")
    assert "certifies this label" in (fields["label"].description or "")


def test_positive_class_is_chosen_or_the_stated_default():
    from roadwork.pipeline.certify import positive_class

    assert positive_class(["no_roadwork", "roadwork"]) == "roadwork"
    assert positive_class(["cat", "dog"]) == "dog" and positive_class(["a", "b", "c"]) is None
    assert positive_class(["cat", "dog"], "cat") == "cat"
    with pytest.raises(ConfigError, match=r"policy.positive_class='cow' is not one of"):
        positive_class(["cat", "dog"], "cow")
    cfg = load_config(
        "default", ["policy.operating_point=recall", "policy.target=0.95", "policy.positive_class=cat"]
    )
    y, _, model = _pool(3000, seed=4)
    calib = Predictions(np.array([f"i{i}" for i in range(3000)]), y, model, ["cat", "dog"], {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)
        policy, _ = certify_served(cfg, calib)
    assert policy.positive_class == "cat" and policy.positive_index == 0
    out = policy.apply(model)
    assert out.score is not None
    np.testing.assert_array_equal(out.score >= 0.5, out.pred == 0)
    assert (out.pred[y == 0] == 0).mean() >= 0.93  # recall of 'cat' near its target
