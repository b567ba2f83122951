"""The model check: a chance-level, constant or untrained model is named before any calibration figure, and a
model that learned is not."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork.evaluation.quality import CHANCE, model_check, paired_gap

CLASSES = ["no_roadwork", "roadwork"]


def _logits(y: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    z = rng.normal(size=len(y)) + signal * (2 * y - 1)
    return np.stack([-z / 2, z / 2], axis=1)


def test_a_model_that_learned_passes() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    mc = model_check(_logits(y, 1.5, rng), y, CLASSES, val_losses=[0.69, 0.5, 0.42])
    assert mc["verdict"] == "ok" and mc["warnings"] == []
    assert mc["mcc_ci95"][0] > 0.3 and mc["auroc_ci95"][0] > 0.8


@pytest.mark.parametrize("seed", range(5))
def test_shuffled_labels_are_no_better_than_chance(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 210)
    logits = _logits(rng.permutation(y), 1.5, rng)  # a confident model of labels that are not these
    mc = model_check(logits, y, CLASSES)
    assert mc["verdict"] == "chance" and CHANCE in mc["warnings"][0]
    assert mc["mcc_ci95"][0] <= 0 <= mc["mcc_ci95"][1] or mc["auroc_ci95"][0] <= 0.5


def test_a_constant_and_a_model_that_never_learned_are_named() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    constant = np.tile([0.3, -0.1], (200, 1))
    mc = model_check(constant, y, CLASSES, val_losses=[0.6935, 0.6931, 0.6940])
    text = " ".join(mc["warnings"])
    assert mc["verdict"] == "chance"
    assert "predicts 'no_roadwork' for every test image" in text
    assert f"never went below ln 2 = {math.log(2):.4f}" in text
    assert "Check the labels" in text and "train longer" in text  # what to do


def test_far_below_a_feature_baseline_is_a_weak_model() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    logits = _logits(y, 0.6, rng)  # about 0.7 accurate: better than chance
    baseline = rng.random(400) < 0.95  # a baseline right on 95 % of the images
    mc = model_check(logits, y, CLASSES, baseline_correct=baseline, pretrained=False)
    assert mc["verdict"] == "weak" and "far below what this data gives" in mc["warnings"][0]
    assert "roadwork run scratch" in mc["warnings"][0]  # the advice for random weights
    # the same model beside a baseline no better than itself: no warning
    same = (logits.argmax(1) == y) ^ (rng.random(400) < 0.02)
    assert model_check(logits, y, CLASSES, baseline_correct=same)["verdict"] == "ok"


def test_paired_gap_counts_only_disagreements() -> None:
    a = np.array([True, True, False, False])
    assert paired_gap(a, a) == (0.0, 0.0)
    gap, se = paired_gap(np.array([False] * 4), np.array([True] * 4))
    assert gap == 1.0 and se == 0.0


@pytest.mark.slow
def test_a_run_on_shuffled_labels_says_so_in_the_cli_metrics_and_report(tmp_path, capsys) -> None:
    """Images whose brightness gives their class away, and a manifest whose labels are shuffled: the run trains,
    calibrates and certifies as always, and says "no better than chance" before any of those figures."""
    pytest.importorskip("torch")
    from roadwork.cli import main
    from tests.conftest import tiny_overrides

    rng = np.random.default_rng(0)
    rows = []
    for i in range(240):
        cls = i % 2
        img = rng.integers(0, 110, (40, 40, 3)) + 130 * cls
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "label": CLASSES[cls]})
    manifest = pd.DataFrame(rows)
    manifest["label"] = rng.permutation(manifest["label"].to_numpy())
    manifest.to_csv(tmp_path / "shuffled.csv", index=False)
    overrides = tiny_overrides(tmp_path / "runs", name="shuffled", **{"cascade.enabled": False})
    assert main(["run", "demo", f"data.source={tmp_path / 'shuffled.csv'}", *overrides]) == 0
    out = capsys.readouterr().out
    assert "NO BETTER THAN CHANCE" in out and CHANCE in out
    assert out.index(CHANCE) < out.index("test results")  # before the calibration figures
    run = tmp_path / "runs" / "shuffled" / "evaluate"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_check"]["verdict"] == "chance"
    assert any(CHANCE in w for w in metrics["warnings"])
    html = (run / "report.html").read_text()
    assert CHANCE in html and html.index("id='model-check'") < html.index("<h2>Summary</h2>")
    assert "Model check:** NO BETTER THAN CHANCE" in (run / "MODEL_CARD.md").read_text()
