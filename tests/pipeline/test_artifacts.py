"""roadwork.pipeline.artifacts: each stage file written and read back in one place."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from roadwork.pipeline import artifacts as A
from roadwork.trust import Predictions
from roadwork.trust.cascade import CascadeStage


def _dataset(tmp_path):
    df = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "path": ["images/a.jpg", "/abs/b.jpg", "images/c.jpg"],
            "label": ["cone", "none", "cone"],
            "split": ["train", "test", "test"],
            "sha256": ["1", "2", "3"],
            "weather": ["fog", "sun", "fog"],
        }
    )
    df.to_parquet(tmp_path / "dataset.parquet", index=False)
    (tmp_path / "data_report.json").write_text(json.dumps({"classes": ["none", "cone"]}))
    return df


def test_dataset_helpers_read_the_data_stage(tmp_path):
    _dataset(tmp_path)
    df, classes = A.load_dataset(tmp_path)
    assert classes == ["none", "cone"]
    test = A.split_rows(df, "test")
    assert test["id"].tolist() == ["b", "c"]
    assert A.label_indices(test, classes).tolist() == [0, 1]
    assert A.abs_paths(test, tmp_path) == ["/abs/b.jpg", str(tmp_path / "images/c.jpg")]
    assert list(A.slice_columns(test)) == ["weather"]  # the dataset's own columns are not slices
    assert A.slice_columns(test)["weather"].tolist() == ["sun", "fog"]


@pytest.mark.parametrize("gate", [False, True])
def test_stage_outputs_round_trip_with_and_without_a_learned_gate(tmp_path, gate):
    rng = np.random.default_rng(0)
    p = Predictions(np.array(["a", "b", "c"]), np.array([0, 1, 1]), rng.normal(size=(3, 2)), ["x", "y"], {})
    z, g = rng.normal(size=(3, 2)), rng.normal(size=3)
    A.write_stage_outputs(tmp_path, "small", "calib", p, z, g if gate else None)
    stage = CascadeStage("small", "network", "stage1-model.onnx", 1.0, info={"gate": gate})
    back = A.stage_outputs(tmp_path, stage, "calib")
    assert back.shape == (3, 3 if gate else 2)
    np.testing.assert_allclose(back[:, :2], z)
    if gate:
        np.testing.assert_allclose(back[:, 2], g)
    assert (tmp_path / "gate-calib-small.parquet").exists() == gate


def test_stage_manifest_is_none_for_a_folder_without_one(tmp_path):
    assert A.stage_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"seconds": 1.5}))
    assert A.stage_manifest(tmp_path) == {"seconds": 1.5}


def test_load_cascade_is_none_when_the_cascade_is_off(tmp_path):
    (tmp_path / "cascade.json").write_text(json.dumps({"enabled": False, "warnings": ["too few rows"]}))
    assert A.load_cascade(tmp_path) is None
