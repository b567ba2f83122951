"""Field estimates from the audit sample: exact intervals that hold at their level over many draws."""

from __future__ import annotations

import numpy as np

from roadwork.field import StoredPrediction, clopper_pearson, field_estimates


def test_clopper_pearson_matches_its_definition_at_the_edges():
    assert clopper_pearson(0, 0) == (None, None)
    low, high = clopper_pearson(0, 20)
    assert low == 0.0 and abs(high - (1 - 0.025 ** (1 / 20))) < 1e-9  # k = 0: 1 - (α/2)^(1/n)
    low, high = clopper_pearson(20, 20)
    assert high == 1.0 and abs(low - 0.025 ** (1 / 20)) < 1e-9


def _population(n: int, rng: np.random.Generator) -> list[tuple[StoredPrediction, int]]:
    """A stream whose true coverage is 0.9 and accuracy 0.8 (binary, positive class 'roadwork')."""
    rows = []
    for i in range(n):
        y = int(rng.random() < 0.4)
        right = rng.random() < 0.8
        label = ["no_roadwork", "roadwork"][y if right else 1 - y]
        covered = right or rng.random() < 0.5  # P(covered) = 0.8 + 0.2 * 0.5 = 0.9
        pred_set = [label] + ([["no_roadwork", "roadwork"][y]] if covered and not right else [])
        p = StoredPrediction(
            f"p{i}",
            0.0,
            "v1",
            label,
            [0.5, 0.5],
            pred_set,
            False,
            "model",
            {"weather": "fog" if i % 4 == 0 else "clear"},
            True,
        )
        rows.append((p, y))
    return rows


def test_intervals_cover_the_true_rates_at_their_level_over_many_audit_samples():
    rng = np.random.default_rng(0)
    draws, n = 400, 200
    hits = {"coverage": 0, "accuracy": 0}
    for _ in range(draws):
        est = field_estimates(_population(n, rng), ["no_roadwork", "roadwork"], positive_class="roadwork")
        for key, truth in (("coverage", 0.9), ("accuracy", 0.8)):
            r = est["overall"][key]
            hits[key] += r["low"] <= truth <= r["high"]
    tol = 3 * np.sqrt(0.95 * 0.05 / draws)  # three binomial standard errors of the hit share
    for key, k in hits.items():
        assert k / draws >= 0.95 - tol, (key, k / draws)


def test_per_slice_rates_and_the_miss_rate():
    rows = _population(400, np.random.default_rng(1))
    est = field_estimates(
        rows, ["no_roadwork", "roadwork"], positive_class="roadwork", slice_columns=["weather"]
    )
    assert set(est["slices"]) == {"weather=clear", "weather=fog"}
    assert est["slices"]["weather=fog"]["accuracy"]["n"] == 100
    positives = [(p, y) for p, y in rows if y == 1]
    missed = sum(p.label != "roadwork" for p, _ in positives)
    assert est["overall"]["miss_rate"]["n"] == len(positives)
    assert abs(est["overall"]["miss_rate"]["rate"] - missed / len(positives)) < 1e-12
