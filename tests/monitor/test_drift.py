"""Drift monitoring: PSI and friends, the server's prediction log, ``roadwork monitor``, and the acceptance
check — the generator's second visual domain is flagged, a fresh sample of the original domain is not."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from roadwork.errors import InputError
from roadwork.monitor.drift import DriftThresholds, compare_predictions, load_predictions, psi


def _table(rng: np.random.Generator, n: int, shift: float = 0.0, weather: str = "clear") -> pd.DataFrame:
    p = np.clip(rng.beta(5 - 3 * shift, 1.5 + 3 * shift, n), 0.5, 1.0)
    return pd.DataFrame(
        {
            "label": np.where(rng.random(n) < 0.5 + shift / 3, "roadwork", "no_roadwork"),
            "probability": p,
            "set_size": np.where(p > 0.8, 1, 2),
            "abstain": p < 0.7,
            "weather": weather,
        }
    )


def test_psi_is_zero_for_the_same_sample_and_grows_with_shift() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)
    small, big = psi(x, rng.normal(0.1, 1, 5000)), psi(x, rng.normal(1.0, 1, 5000))
    assert 0 < small < 0.1 < 0.25 < big
    # without a shift PSI sits near its small-sample floor 9 (1/n + 1/m)
    null = [psi(rng.normal(size=300), rng.normal(size=300)) for _ in range(200)]
    assert 0.5 * 9 * (2 / 300) < np.mean(null) < 1.5 * 9 * (2 / 300)
    with pytest.raises(InputError):
        psi(x, [])


def test_compare_flags_each_signal_and_slices() -> None:
    rng = np.random.default_rng(1)
    ref = _table(rng, 2000)
    same = compare_predictions(ref, _table(rng, 800))
    assert not same["drift"] and same["overall"]["psi_confidence"] < same["thresholds"]["psi"]
    moved = compare_predictions(
        ref, pd.concat([_table(rng, 400), _table(rng, 400, shift=0.6, weather="fog")])
    )
    assert moved["drift"] and "confidence PSI" in moved["overall"]["reasons"][0]
    assert "weather=clear" in moved["slices"] and not moved["slices"]["weather=clear"]["drift"]
    assert "weather=fog" not in moved["slices"]  # no reference rows for fog: not comparable per slice
    strict = compare_predictions(ref, _table(rng, 800), thresholds=DriftThresholds(psi=0.001))
    assert strict["drift"]
    with pytest.raises(InputError, match="lack columns"):
        compare_predictions(ref.drop(columns="abstain"), ref)


def test_prediction_log_rotates_atomically(tmp_path) -> None:
    from roadwork.serve.prediction_log import PredictionLog

    log = PredictionLog(tmp_path / "logs", rows_per_file=3)
    rec = {
        "label": "roadwork",
        "probability": 0.9,
        "prediction_set": ["roadwork"],
        "abstain": False,
        "stage": "small",
    }
    for i in range(7):
        log.add([rec], [{"weather": "fog" if i % 2 else "rain", "ts": "ignored", "x" * 100: "long key"}])
    log.flush()
    files = sorted((tmp_path / "logs").glob("*.parquet"))
    assert len(files) == 3 and not list((tmp_path / "logs").glob("*.tmp"))
    df = load_predictions(tmp_path / "logs")
    assert len(df) == 7 and set(df["weather"]) == {"fog", "rain"} and (df["set_size"] == 1).all()
    assert df["ts"].dtype.kind == "f" and set(df["stage"]) == {"small"} and "x" * 64 in df.columns


@pytest.fixture(scope="module")
def domain_a_run(tmp_path_factory):
    """A tiny model trained on the generator's domain A only; its bundle carries the drift reference."""
    from roadwork.config import load_config
    from roadwork.pipeline import run_pipeline
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("drift")
    over = {
        # 2,000 scenes: ~300 reference rows, so a fresh in-domain sample's PSI noise, about
        # (bins - 1) * (1/n_ref + 1/n_sample) ~ 0.07, stays well under the 0.25 alert (with 800 it reached 0.31)
        "data.synthetic.n": 2000,
        "data.synthetic.domain_b_fraction": 0,
        "train.epochs": 3,
        "cascade.enabled": False,
    }
    cfg = load_config("demo", tiny_overrides(root, name="domain-a", **over))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(cfg, progress=False)


def _served(bundle, domain_b_fraction: float, n: int, seed: int) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    from roadwork.data.synthetic import iter_scenes

    images = [im for _, im in iter_scenes(n, size=128, seed=seed, domain_b_fraction=domain_b_fraction)]
    recs = []
    for i in range(0, n, 64):
        recs += bundle.predict_images(images[i : i + 64]).records(bundle.classes)
    return pd.DataFrame(
        {
            "label": [r["label"] for r in recs],
            "probability": [r["probability"] for r in recs],
            "set_size": [len(r["prediction_set"]) for r in recs],
            "abstain": [r["abstain"] for r in recs],
        }
    )


def test_second_domain_is_flagged_and_the_first_is_not(domain_a_run) -> None:
    """20 random samples of 200 served images each: every domain-B sample's confidence PSI is above the alert
    threshold, every fresh domain-A sample's below it."""
    from roadwork.export.bundle import Bundle

    bundle = Bundle.load(domain_a_run.bundle)
    ref = load_predictions(domain_a_run.bundle)  # the calibration split, from the bundle's reference.json
    assert len(ref) > 100 and set(ref["domain"]) == {"A"}
    pools = {"A": _served(bundle, 0.0, 400, seed=11), "B": _served(bundle, 1.0, 400, seed=12)}
    rng = np.random.default_rng(0)
    th = DriftThresholds().psi
    values = {
        name: [
            compare_predictions(ref, pool.iloc[rng.choice(len(pool), 200, replace=False)])["overall"][
                "psi_confidence"
            ]
            for _ in range(20)
        ]
        for name, pool in pools.items()
    }
    assert max(values["A"]) < th < min(values["B"]), values


def test_cli_monitor_reads_a_bundle_and_a_log(domain_a_run, tmp_path, capsys) -> None:
    from roadwork.cli import main
    from roadwork.export.bundle import Bundle

    served = _served(Bundle.load(domain_a_run.bundle), 1.0, 120, seed=5)
    served.to_parquet(tmp_path / "log.parquet")
    out = tmp_path / "drift.json"
    assert (
        main(
            ["monitor", str(domain_a_run.run_dir), str(tmp_path / "log.parquet"), f"out={out}", "min_rows=30"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "DRIFT: the served traffic" in text and "overall" in text
    assert json.loads(out.read_text())["drift"] is True
    assert main(["monitor", str(domain_a_run.run_dir)]) == 2
    assert main(["monitor", "a", "b", "psi=high"]) == 2


def test_missing_inputs_are_explained(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_predictions(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no prediction logs"):
        load_predictions(tmp_path / "empty")
