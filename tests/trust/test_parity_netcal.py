"""Calibration parity with netcal and scikit-learn on identical inputs, and ECE against Guo et al.'s definition.

netcal and scikit-learn are in the dev extra; each test is skipped where its peer is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from roadwork.trust import metrics as M
from roadwork.trust._calibrators import HistogramBinning, IsotonicCalibrator
from roadwork.trust._checks import softmax
from roadwork.trust.calibration import TemperatureScaler


def _task(n: int, k: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, k))
    p = softmax(z / temperature)
    return z, (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)


@pytest.mark.parametrize(("k", "temperature"), [(2, 0.6), (10, 2.0), (100, 1.3)])
def test_temperature_equals_netcal(k, temperature):
    netcal = pytest.importorskip("netcal.scaling")
    z, y = _task(3000, k, temperature, k)
    ours = TemperatureScaler().fit(z, y).temperature_
    ref = netcal.TemperatureScaling()
    ref.fit(softmax(z) if k > 2 else softmax(z)[:, 1], y)  # netcal takes confidences; binary: P(class 1)
    assert ours == pytest.approx(1.0 / float(np.ravel(ref.temperature)[0]), rel=1e-4)


def test_histogram_binning_equals_netcal():
    netcal = pytest.importorskip("netcal.binning")
    z, y = _task(5000, 2, 0.7, 1)
    p1 = softmax(z)[:, 1]
    ours = HistogramBinning(n_bins=10, strategy="uniform").fit(z, y)
    ref = netcal.HistogramBinning(bins=10)
    ref.fit(p1, y)
    z_new, _ = _task(2000, 2, 0.7, 2)
    assert np.allclose(ours.predict_proba(z_new)[:, 1], ref.transform(softmax(z_new)[:, 1]), atol=1e-4)


def test_isotonic_equals_scikit_learn():
    iso = pytest.importorskip("sklearn.isotonic")
    z, y = _task(3000, 2, 1.5, 3)
    p1 = softmax(z)[:, 1]
    ours = IsotonicCalibrator().fit(z, y)
    ref = iso.IsotonicRegression(out_of_bounds="clip").fit(p1, y)
    z_new, _ = _task(2000, 2, 1.5, 4)
    assert np.allclose(ours.predict_proba(z_new)[:, 1], ref.predict(softmax(z_new)[:, 1]), atol=1e-4)


def test_ece_equals_a_direct_implementation_of_guo_et_al():
    """ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)| over M equal-width confidence bins ((m-1)/M, m/M]."""
    z, y = _task(4000, 5, 1.7, 5)
    p = softmax(z)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    total = 0.0
    for m in range(1, 16):
        in_bin = (conf > (m - 1) / 15) & (conf <= m / 15)
        if in_bin.any():
            total += in_bin.mean() * abs((pred[in_bin] == y[in_bin]).mean() - conf[in_bin].mean())
    assert M.ece(p, y, n_bins=15) == pytest.approx(total, abs=1e-12)
