from __future__ import annotations

import numpy as np

from roadwork.trust import AbstentionCertificate, Predictions, SplitConformal, TemperatureScaler, TrustPolicy
from roadwork.trust._checks import softmax


def _policy() -> tuple[TrustPolicy, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (400, 2))
    y = (softmax(z / 2)[:, 1] > rng.random(400)).astype(int)
    cal = TemperatureScaler().fit(z, y)
    conf = SplitConformal(alpha=0.1).fit(cal.predict_proba(z), y)
    cert = AbstentionCertificate(0.8, 0.05, 0.05, 400, 0.5, 0.03, 0.049)
    return TrustPolicy(["no_roadwork", "roadwork"], cal, conf, cert, positive_class="roadwork"), z


def test_policy_json_round_trip_is_bit_for_bit():
    policy, z = _policy()
    back = TrustPolicy.from_json(policy.to_json())
    assert back.to_json() == policy.to_json()
    a, b = policy.apply(z), back.apply(z)
    for field in ("probs", "pred", "confidence", "sets", "abstain"):
        assert np.array_equal(getattr(a, field), getattr(b, field))


def test_apply_is_consistent():
    policy, z = _policy()
    out = policy.apply(z)
    assert np.array_equal(out.abstain, out.confidence < 0.8)
    assert np.array_equal(out.pred, out.probs.argmax(1))
    rec = out.records(policy.classes)[0]
    assert set(rec) == {"label", "probability", "prediction_set", "abstain", "score"}
    assert rec["score"] == round(float(out.probs[0, 1]), 6)


def test_infinite_thresholds_survive_json():
    policy, z = _policy()
    policy.abstention = AbstentionCertificate(float("inf"), 0.01, 0.05, 10, 0.0, 0.0, 1.0)
    assert TrustPolicy.from_json(policy.to_json()).apply(z).abstain.all()


def test_predictions_parquet_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    p = Predictions(
        np.array(["a", "b", "c"]),
        np.array([0, 1, 1]),
        rng.normal(size=(3, 2)),
        ["x", "y"],
        {"weather": np.array(["fog", "clear", "fog"])},
    )
    p.to_parquet(tmp_path / "p.parquet")
    q = Predictions.from_parquet(tmp_path / "p.parquet")
    assert np.array_equal(q.logits, p.logits) and q.classes == p.classes
    assert list(q.ids) == ["a", "b", "c"] and list(q.slices["weather"]) == ["fog", "clear", "fog"]


def test_operating_point_and_risk_control_round_trip():
    from roadwork.trust.operating import fit_operating_point
    from roadwork.trust.risk import FalseNegativeControl

    policy, z = _policy()
    probs = policy.calibrator.predict_proba(z)
    y = (probs[:, 1] > np.random.default_rng(1).random(len(z))).astype(int)
    policy.operating_point = fit_operating_point(probs[:, 1], y == 1, criterion="max_mcc")
    policy.risk_control = FalseNegativeControl(alpha=0.1).fit(probs, y)
    back = TrustPolicy.from_json(policy.to_json())
    assert back.to_json() == policy.to_json()
    a, b = policy.apply(z), back.apply(z)
    assert a.score is not None and b.score is not None and np.array_equal(a.score, b.score)
    assert a.positive_possible is not None and b.positive_possible is not None
    assert np.array_equal(a.positive_possible, b.positive_possible)
    assert "positive_possible" in a.records(policy.classes)[0]


def test_slices_reach_the_per_slice_calibrator_and_group_mondrian():
    from roadwork.trust.calibration import SliceCalibrator

    rng = np.random.default_rng(1)
    n = 3000
    g = np.where(rng.random(n) < 0.5, "day", "night")
    z = rng.normal(0, 3, (n, 2))
    t_true = np.where(g == "night", 4.0, 1.0)  # night logits are 4x overconfident
    y = (softmax(z / t_true[:, None])[:, 1] > rng.random(n)).astype(int)
    cal = SliceCalibrator("temperature", "weather", min_count=100).fit(z, y, g)
    assert cal.per_value_["night"].temperature_ > 3 > 1.5 > cal.per_value_["day"].temperature_
    probs = cal.predict_proba(z, g)
    conf = SplitConformal(alpha=0.1, mondrian="group", group_by="weather").fit(probs, y, g)
    cert = AbstentionCertificate(0.8, 0.05, 0.05, n, 0.5, 0.03, 0.049)
    policy = TrustPolicy(["no_roadwork", "roadwork"], cal, conf, cert, positive_class="roadwork")
    with_meta = policy.apply(z, {"weather": g})
    assert np.allclose(with_meta.probs, probs)
    without = policy.apply(z)  # no metadata: the global calibrator and the global threshold
    assert np.allclose(without.probs, cal.global_.predict_proba(z))
    assert np.array_equal(without.sets, conf.predict_sets(without.probs, np.full(n, "unseen")))
    back = TrustPolicy.from_json(policy.to_json())
    assert np.array_equal(back.apply(z, {"weather": g}).sets, with_meta.sets)
    assert back.slice_columns == ["weather"]


def test_a_deeply_nested_policy_file_is_our_error(tmp_path):
    import pytest

    from roadwork.errors import ArtifactError
    from roadwork.trust import TrustPolicy

    deep = tmp_path / "policy.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested too deeply|Could not read policy"):
        TrustPolicy.load(deep)


def _policy_dict() -> dict:  # type: ignore[type-arg]
    return _policy()[0].to_dict()


def test_policy_json_of_the_wrong_shape_is_our_error_naming_the_file():
    """Not an object, a cascade that is a string, stages that are a number, nesting deeper than the parser's
    recursion: each is an ArtifactError naming the file and the fix, never an AttributeError/TypeError/
    RecursionError traceback (a bundle's policy.json can be any bytes its signer put there)."""
    import json

    import pytest

    from roadwork.errors import ArtifactError

    cases = {
        "[]": "holds an array",
        "null": "holds null",
        '"policy"': "holds a string",
        "[" * 1200 + "]" * 1200: "nested too deeply",
        json.dumps(_policy_dict() | {"cascade": "cascade"}): "wrong type",
        json.dumps(_policy_dict() | {"cascade": {"stages": 5}}): "wrong type",
        json.dumps({k: v for k, v in _policy_dict().items() if k != "conformal"}): "no 'conformal' field",
        "{": "not JSON",
    }
    for text, why in cases.items():
        with pytest.raises(ArtifactError, match=why) as err:
            TrustPolicy.from_json(text, where="bundle/policy.json")
        assert "'bundle/policy.json' is not a valid policy" in str(err.value)
        assert "Re-export the bundle" in str(err.value)


def test_any_field_of_the_wrong_type_is_refused_or_read_never_a_traceback():
    import contextlib
    import json

    from roadwork.errors import ArtifactError

    wrong = [[], {}, "x", 5, -1.5, True, None, [[]], {"stages": []}, "[" * 50 + "]" * 50]
    base = _policy_dict()
    for key in base:
        for value in wrong:
            edits = [base | {key: value}]
            edits += (
                [base | {key: base[key] | {sub: value}} for sub in base[key]]
                if isinstance(base[key], dict)
                else []
            )
            for edited in edits:
                with contextlib.suppress(ArtifactError):
                    TrustPolicy.from_json(json.dumps(edited))
