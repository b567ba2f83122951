"""``roadwork compare``: one row per installed framework on the same features and splits; a missing one is
named as skipped, not an error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork.evaluation import compare as C
from roadwork.models.boosting import BoostingParams, available_frameworks


def _split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return x, (x[:, 0] - x[:, 1] > 0).astype(int)


def test_rows_per_framework_and_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    feats, labels = {}, {}
    for split, n in (("train", 300), ("calib", 200), ("test", 200)):
        feats[split], labels[split] = _split(rng, n)
    have = available_frameworks()
    monkeypatch.setattr(C, "available_frameworks", lambda: {**have, "catboost": False})
    rows = C.compare_frameworks(feats, labels, 2, alpha=0.1, params=BoostingParams(rounds=15, max_depth=3))
    by = {r["framework"]: r for r in rows}
    assert list(by) == ["sklearn", "xgboost", "lightgbm", "catboost"]
    assert by["catboost"]["status"].startswith("skipped: not installed (pip install catboost)")
    for fw, ok in have.items():
        if ok and fw != "catboost":
            r = by[fw]
            assert r["status"] == "ok" and r["accuracy"] > 0.8 and r["trees"] == 15
            assert 0 <= r["ece_after"] <= 1 and r["mean_set_size"] >= 0.5 and r["predict_us_native"] > 0
    assert C.format_compare(rows, alpha=0.1).row_count == 4


def test_cli_compare_runs_on_a_small_dataset(tmp_path, capsys) -> None:
    from roadwork.cli import main
    from tests.conftest import tiny_overrides

    args = [
        "compare",
        "demo",
        *tiny_overrides(tmp_path, name="cmp"),
        "cascade.boosting_rounds=10",
        "frameworks=sklearn,lightgbm",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sklearn" in out and "lightgbm" in out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["framework"] for r in rows] == ["sklearn", "lightgbm"]
    assert main(["compare", "demo", *tiny_overrides(tmp_path, name="cmp"), "frameworks=gbm9000"]) == 2
    assert "frameworks=gbm9000 is unknown" in capsys.readouterr().err
