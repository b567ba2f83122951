from __future__ import annotations

import numpy as np

from roadwork.config import SyntheticConfig
from roadwork.data.synthetic import CLASSES, generate_dataset, iter_scenes


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = [np.asarray(im) for _, im in iter_scenes(6, size=64, seed=3)]
    b = [np.asarray(im) for _, im in iter_scenes(6, size=64, seed=3)]
    c = [np.asarray(im) for _, im in iter_scenes(6, size=64, seed=4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_output_does_not_depend_on_worker_count(tmp_path):
    one = generate_dataset(tmp_path / "a", SyntheticConfig(n=70, size=48, seed=1, workers=1), progress=False)
    two = generate_dataset(tmp_path / "b", SyntheticConfig(n=70, size=48, seed=1, workers=2), progress=False)
    assert [r["sha256"] for r in one] == [r["sha256"] for r in two]


def test_slices_and_label_balance_cover_every_value():
    specs = [s for s, _ in iter_scenes(300, size=32, seed=0)]
    assert {s.weather for s in specs} == {"clear", "rain", "fog", "snow"}
    assert {s.time for s in specs} == {"day", "dusk", "night"}
    assert {s.camera for s in specs} == {"sharp", "blur", "jpeg"}
    assert {s.domain for s in specs} == {"A", "B"}
    pos = np.mean([s.label for s in specs])
    assert abs(pos - 0.5) < 3 * np.sqrt(0.25 / 300)
    assert all((s.zone_distance == "none") == (s.true_label == 0) for s in specs)
    # hard negatives exist: distractors on images without a work zone
    assert sum(s.distractor != "none" and s.true_label == 0 for s in specs) > 30


def test_label_noise_is_recorded_at_the_requested_rate():
    specs = [s for s, _ in iter_scenes(800, size=16, seed=0, label_noise=0.2)]
    flipped = np.array([s.label_flipped for s in specs])
    assert abs(flipped.mean() - 0.2) < 3 * np.sqrt(0.2 * 0.8 / 800)
    assert all((s.label != s.true_label) == s.label_flipped for s in specs)


def test_rows_carry_paths_hashes_and_class_indices(tmp_path):
    rows = generate_dataset(tmp_path, SyntheticConfig(n=8, size=32, workers=1), progress=False)
    assert [r["path"] for r in rows] == [f"{i:06d}.jpg" for i in range(8)]
    assert all((tmp_path / str(r["path"])).is_file() and len(str(r["sha256"])) == 64 for r in rows)
    assert {r["label"] for r in rows} <= set(range(len(CLASSES)))
