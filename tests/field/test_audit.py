"""The label audit: flip rates estimated within two points at 5 % and 10 % flipped labels, the suspects ranked,
and `roadwork audit RUN` writing its files."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("cleanlab")

from roadwork.errors import InputError
from roadwork.field.audit import label_audit


def _noisy(n: int, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-sample probabilities of a model that is right ~91 % of the time (the demo's accuracy), given labels
    with ``rate`` of them flipped, and the probabilities from a temperature fitted on those noisy labels, as the
    calibrate stage fits it on a noisy calibration split."""
    from roadwork.trust.calibration import TemperatureScaler

    y_true = rng.integers(0, 2, n)
    margin = rng.normal(2.0, 1.5, n)
    logits = np.stack([np.where(y_true == k, margin, 0.0) for k in range(2)], axis=1)
    flipped = rng.random(n) < rate
    given = np.where(flipped, 1 - y_true, y_true)
    return TemperatureScaler().fit(logits, given).predict_proba(logits), given, flipped


@pytest.mark.parametrize("rate", [0.05, 0.10])
def test_the_flip_rate_is_estimated_within_two_points(rate):
    rng = np.random.default_rng(int(rate * 100))
    errors = []
    for _ in range(20):
        probs, given, _ = _noisy(2000, rate, rng)
        result = label_audit(probs, given, ["no_roadwork", "roadwork"], [str(i) for i in range(len(given))])
        errors.append(result["flip_rate"] - rate)
    assert np.mean(np.abs(errors) <= 0.02) >= 0.9, errors  # within two points in at least 18 of 20 draws
    assert result["suggested_label_flip_rate"] == pytest.approx(result["flip_rate"], abs=1e-4)


@pytest.mark.parametrize("rate", [0.05, 0.10])
def test_conformal_with_the_suggested_flip_rate_covers_clean_labels_at_one_minus_alpha(rate):
    """Calibrated on noisy labels without a correction, the sets miss 1 - alpha on the clean labels; with the
    audit's suggested label_flip_rate (through the pipeline's own conversion to the noise model's epsilon) the mean
    coverage over 200 re-splits is back near 1 - alpha: not below it beyond three standard errors plus a point, and
    within 2.5 points above it (an estimate within 2 points of the flip rate moves the noise model's epsilon by up to
    4; the flagged share errs low, so the sets err on the covering side)."""
    from roadwork.config import ConformalConfig
    from roadwork.pipeline.certify import flip_to_noise
    from roadwork.trust.conformal import SplitConformal

    rng = np.random.default_rng(7 + int(100 * rate))
    probs, given, flipped = _noisy(4000, rate, rng)
    clean = np.where(flipped, 1 - given, given)
    audit = label_audit(probs, given, ["a", "b"], [str(i) for i in range(len(given))])
    eps = flip_to_noise(ConformalConfig(label_flip_rate=audit["suggested_label_flip_rate"]), 2)
    plain, corrected = [], []
    for _ in range(200):
        idx = rng.permutation(len(given))
        cal, test = idx[:1000], idx[1000:]
        for out, noise in ((plain, 0.0), (corrected, eps)):
            sets = (
                SplitConformal(alpha=0.1, label_noise=noise)
                .fit(probs[cal], given[cal])
                .predict_sets(probs[test])
            )
            out.append(sets[np.arange(len(test)), clean[test]].mean())
    se = 3 * np.std(corrected) / np.sqrt(len(corrected))
    assert abs(np.mean(plain) - 0.9) > 0.02  # noisy labels move the uncorrected coverage off target
    got = (np.mean(plain), np.mean(corrected), eps)
    assert 0.9 - se - 0.01 <= np.mean(corrected) <= 0.9 + 0.025, got
    assert abs(np.mean(corrected) - 0.9) < abs(np.mean(plain) - 0.9), got


def test_the_suspects_are_mostly_the_flipped_labels_and_bad_input_is_our_error():
    probs, given, flipped = _noisy(2000, 0.10, np.random.default_rng(3))
    result = label_audit(probs, given, ["a", "b"], [str(i) for i in range(len(given))])
    top = [int(r["id"]) for r in result["issues"][:100]]
    assert np.mean(flipped[top]) >= 0.9  # the most suspect labels are flipped ones
    assert all(r["suggested"] != r["given"] for r in result["issues"][:100])
    with pytest.raises(InputError, match="do not agree"):
        label_audit(probs[:10], given, ["a", "b"], [])
    with pytest.raises(InputError, match="no row is labelled"):
        label_audit(probs, np.zeros(len(given), int), ["a", "b"], [str(i) for i in range(len(given))])


def test_roadwork_audit_writes_the_suspects_and_the_rates(tiny_run, capsys):
    from roadwork.cli import main

    _, result = tiny_run
    assert main(["audit", str(result.run_dir), "top=3"]) == 0
    out = capsys.readouterr().out
    assert "estimated flip rate" in out and "label_issues.csv" in out
    issues = (result.run_dir / "audit" / "label_issues.csv").read_text().splitlines()
    assert issues[0] == "id,path,given,suggested,score"
    report = json.loads((result.run_dir / "audit" / "audit.json").read_text())
    assert report["n"] > 0 and set(report["flip_rate_per_class"]) == {"no_roadwork", "roadwork"}
    assert main(["audit", str(result.run_dir / "nope")]) == 2
