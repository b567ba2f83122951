"""``roadwork sweep``: two tiny trials, interrupted after the first and resumed; the best config re-runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("optuna")

from roadwork.config import load_config
from roadwork.errors import ConfigError
from roadwork.scale.sweep import load_space, run_sweep
from tests.conftest import tiny_overrides


def test_sweep_resumes_and_writes_a_rerunnable_best(tmp_path, capsys):
    from roadwork.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(
        "train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n"
        "calibrate.method: {type: categorical, choices: [temperature, isotonic]}\n"
    )
    over = tiny_overrides(tmp_path / "runs", name="sw", **{"cascade.enabled": False, "train.epochs": 1})
    assert main(["sweep", "demo", *over, f"space={space}", "trials=1"]) == 0  # "interrupted" after one trial
    first = json.loads((tmp_path / "runs" / "sw-sweep" / "trials.json").read_text())
    assert len(first) == 1 and first[0]["state"] == "COMPLETE"
    cfg = load_config("demo", over)
    res = run_sweep(cfg, load_space(space, cfg), trials=2)  # resumes: runs only the second trial
    assert [t["trial"] for t in res["trials"]] == [0, 1] and res["trials"][0] == first[0]
    assert (tmp_path / "runs" / "sw-t0").is_dir() and (tmp_path / "runs" / "sw-t1").is_dir()
    best = load_config(str(tmp_path / "runs" / "sw-sweep" / "best.yaml"))
    assert best.name == "sw-best" and best.train.lr == pytest.approx(res["best"]["params"]["train.lr"])
    assert best.calibrate.method == res["best"]["params"]["calibrate.method"]


def test_bad_spaces_are_explained(tmp_path):
    cfg = load_config("demo")
    bad = tmp_path / "bad.yaml"
    for text, msg in (
        ("train.lrr: {type: float, low: 0.1, high: 1}\n", "not a config key"),
        ("train.lr: {type: float, low: 1, high: 0.1}\n", "low < high"),
        ("train.lr: {type: beta}\n", "type: float, int or categorical"),
        ("calibrate.method: {type: categorical}\n", "choices"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_space(bad, cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml", cfg)


def test_sweep_on_ray_tune(tmp_path):
    ray = pytest.importorskip("ray")
    from roadwork.scale.sweep import run_sweep_ray

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n")
    cfg = load_config(
        "demo",
        tiny_overrides(tmp_path / "runs", name="tune", **{"cascade.enabled": False, "train.epochs": 2}),
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_sweep_ray(cfg, load_space(space, cfg), trials=2)
    finally:
        ray.shutdown()
    assert len(res["trials"]) == 2 and all(t["value"] is not None for t in res["trials"])
    best = load_config(str(tmp_path / "runs" / "tune-sweep" / "best.yaml"))
    assert best.train.lr == pytest.approx(res["best"]["params"]["train.lr"])
    assert min(t["value"] for t in res["trials"]) == pytest.approx(res["best"]["value"])
