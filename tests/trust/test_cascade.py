"""Cascade gates: routing, the fixed-sequence certificate (tested over hundreds of random calibration draws),
running only the rows that reach a stage, and the policy's JSON round trip."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from roadwork.errors import InputError, RoadworkWarning
from roadwork.trust import TemperatureScaler, TrustPolicy
from roadwork.trust.cascade import CascadeStage, cascade_curve, fit_cascade, gate_grid, route, select_cascade
from tests.trust.test_policy import _policy  # a fitted binary policy

FLOOR = 0.6


def _population(n: int = 40_000, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Three stages that share which images are hard (a latent margin) and add their own noise; later stages
    are better. Returns each stage's (n, 2) probabilities and the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    margin = rng.gamma(2.0, 1.0, n) - 0.6  # shared difficulty; negative margin: every stage tends to err
    probs = []
    for quality, noise in ((0.9, 1.6), (1.4, 1.0), (2.2, 0.5)):
        z = quality * margin + noise * rng.normal(size=n)
        p1 = 1 / (1 + np.exp(-np.where(y == 1, z, -z)))
        probs.append(np.stack([1 - p1, p1], 1))
    return probs, y


def _stages(k: int = 3) -> list[CascadeStage]:
    return [CascadeStage(f"s{i}", "network", f"s{i}.onnx", cost_ms=float(4**i)) for i in range(k)]


def test_route_picks_the_first_confident_stage() -> None:
    confs = [np.array([0.95, 0.5, 0.5, 0.99]), np.array([0.2, 0.97, 0.1, 0.99])]
    np.testing.assert_array_equal(route(confs, 0.9), [0, 1, 2, 0])
    np.testing.assert_array_equal(route(confs, math.inf), [2, 2, 2, 2])
    g = gate_grid(0.7, 20)
    assert g[0] > 0.9999 and abs(g[-1] - 0.7) < 1e-12 and np.all(np.diff(g) < 0)


@pytest.mark.parametrize("mode", ["match", "risk"])
def test_certified_risk_holds_over_many_calibration_draws(mode: str) -> None:
    """≥ 200 calibration draws (with replacement from a fixed population, so they are i.i.d.): the population
    risk at the certified gate exceeds the target in at most a δ fraction, plus three Monte Carlo standard
    errors. An uncorrected choice (the loosest gate whose *empirical* risk meets the target) breaks it, which
    shows the check has teeth."""
    probs, y = _population()
    target, delta, n_cal, draws = (0.01, 0.1, 1000, 300) if mode == "match" else (0.15, 0.1, 2000, 300)
    grid = gate_grid(FLOOR)
    pop = cascade_curve(probs, y, [1, 4, 16], grid, mode)
    pop_risk = dict(zip(pop["threshold"].tolist(), pop["risk"].tolist(), strict=True))
    assert pop["risk"].min() < target < pop["risk"].max()  # the target cuts through the grid: a real choice
    rng = np.random.default_rng(1)
    bad = naive_bad = certified = 0
    for _ in range(draws):
        idx = rng.integers(0, len(y), n_cal)
        sub = [p[idx] for p in probs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoadworkWarning)
            c = fit_cascade(_stages(), sub, y[idx], mode=mode, target=target, delta=delta, floor=FLOOR)
        if c.certified:
            certified += 1
            assert c.bound_pvalue <= delta and c.calib_risk <= target
            bad += pop_risk[c.threshold] > target
        emp = cascade_curve(sub, y[idx], [1, 4, 16], grid, mode)
        ok = np.flatnonzero(emp["risk"] <= target)
        naive_bad += bool(len(ok)) and pop_risk[float(grid[ok[-1]])] > target
    tol = delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert certified > 0.8 * draws  # the bound is not vacuous: most draws certify an early exit
    assert bad / draws <= tol, (bad, draws)
    assert naive_bad / draws > tol  # without the certificate the guarantee fails


def test_match_mode_keeps_accuracy_within_the_margin_on_fresh_rows() -> None:
    probs, y = _population()
    c = fit_cascade(_stages(), [p[:3000] for p in probs], y[:3000], mode="match", target=0.01, floor=FLOOR)
    assert c.certified and FLOOR <= c.threshold < 1
    stage = route([p[3000:].max(1) for p in probs[:-1]], c.threshold)
    answer = np.choose(stage, [p[3000:].argmax(1) for p in probs])
    acc_last = (probs[-1][3000:].argmax(1) == y[3000:]).mean()
    assert (answer == y[3000:]).mean() >= acc_last - 0.01
    assert c.expected_cost(stage) < 0.8 * 21  # cheaper than running every stage on every image
    assert np.bincount(stage, minlength=3)[0] > 0


def test_uncertifiable_target_sends_everything_to_the_last_stage() -> None:
    probs, y = _population(n=300)
    with pytest.warns(RoadworkWarning, match="no cascade gate"):
        c = fit_cascade(_stages(), probs, y, mode="risk", target=0.001)
    assert not c.certified and c.threshold == math.inf


def test_bad_arguments() -> None:
    probs, y = _population(n=100)
    with pytest.raises(InputError, match="one probability matrix per stage"):
        fit_cascade(_stages(2), probs, y)
    with pytest.raises(InputError, match="mode"):
        fit_cascade(_stages(), probs, y, mode="cheap")  # type: ignore[arg-type]


def test_policy_runs_later_stages_only_on_rows_that_reach_them_and_round_trips() -> None:
    policy, _ = _policy()
    probs, y = _population(n=2000)
    stages = _stages()
    logits = [np.log(p) for p in probs]
    for st, z in zip(stages[:-1], logits, strict=False):
        st.calibrator = TemperatureScaler().fit(z[:1000], y[:1000])
    policy.cascade = fit_cascade(
        stages, [*probs[:-1], policy.apply(logits[-1]).probs], y, target=0.02, floor=0.5
    )
    seen: dict[int, int] = {}

    def stage_logits(s: int, rows: np.ndarray) -> np.ndarray:
        seen[s] = len(rows)
        return logits[s][rows]

    out = policy.apply_cascade(stage_logits, len(y))
    assert out.stage is not None
    assert seen[0] == len(y) and seen[1] == (out.stage >= 1).sum() and seen[2] == (out.stage == 2).sum()
    np.testing.assert_allclose(out.probs[out.stage == 2], policy.apply(logits[2]).probs[out.stage == 2])
    assert {r["stage"] for r in out.records(policy.classes)} <= {"s0", "s1", "s2"}
    back = TrustPolicy.from_json(policy.to_json())
    again = back.apply_cascade(lambda s, rows: logits[s][rows], len(y))
    np.testing.assert_array_equal(again.stage, out.stage)
    np.testing.assert_allclose(again.probs, out.probs)
    with pytest.raises(InputError, match="no cascade"):
        _policy()[0].apply_cascade(stage_logits, 3)


def test_selection_drops_stages_that_cost_more_than_they_save() -> None:
    probs, y = _population(n=4000)
    stages = _stages()  # costs 1, 4, 16
    c, rows = select_cascade(stages, probs, y, mode="match", target=0.01, floor=FLOOR)
    assert len(rows) == 4 and sum(r["chosen"] for r in rows) == 1
    assert rows[0]["stages"] == ["s2"] and rows[0]["calib_cost_ms"] == 16
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["calib_cost_ms"] == min(r["calib_cost_ms"] for r in rows if r["certified"])
    assert c.names == chosen["stages"] and c.delta == 0.05
    # an early stage as expensive as the model can never pay off: only the model is kept
    pricey = [CascadeStage(s.name, s.kind, s.file, cost_ms=16.0) for s in stages]
    c2, rows2 = select_cascade(pricey, probs, y, mode="match", target=0.01, floor=FLOOR)
    assert c2.names == ["s2"] and rows2[0]["chosen"]
    assert c2.expected_cost(np.full(5, 0)) == 16.0
