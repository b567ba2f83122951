"""The decoded-image cache on disk: the pixels of the shared decode path, reused when nothing changed, read per
batch without mapping the file, and training that gives the same result from disk, from RAM and with workers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadwork.data.preprocess import PreprocessSpec
from roadwork.training import data as cache_mod
from roadwork.training.data import DiskImages, build_cache, cache_key

SPEC = PreprocessSpec(size=24)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray]:
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(40):
        label = i % 2
        a = (rng.integers(0, 120, (60 + i, 80, 3)) + 120 * label).astype(np.uint8)
        p = d / (f"{i}.jpg" if i % 3 else f"{i}.png")
        Image.fromarray(a).save(p)
        paths.append(str(p))
        labels.append(label)
    return paths, np.array(labels)


def _reference(paths: list[str], spec: PreprocessSpec = SPEC) -> np.ndarray:
    from roadwork.training.loop import load_uint8

    return load_uint8(paths, spec, progress=False)


def test_the_cache_holds_the_shared_decode_paths_pixels(
    photos: tuple[list[str], np.ndarray], tmp_path: Path
) -> None:
    paths, _ = photos
    ref = _reference(paths)
    one = build_cache(paths, SPEC, cache_dir=tmp_path / "a", workers=1)
    two = build_cache(paths, SPEC, cache_dir=tmp_path / "b", workers=2)  # worker processes fill it
    assert len(one) == 40 and os.path.getsize(one.file) == 40 * 24 * 24 * 3
    np.testing.assert_array_equal(one[np.arange(40)], ref)
    np.testing.assert_array_equal(two[np.arange(40)], ref)
    idx = np.array([7, 3, 4, 5, 39, 0, 7])  # unsorted, runs, repeats
    np.testing.assert_array_equal(one[idx], ref[idx])
    np.testing.assert_array_equal(one[10:17], ref[10:17])


def test_a_second_run_reuses_the_cache_and_any_change_misses_it(
    photos: tuple[list[str], np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths, _ = photos
    first = build_cache(paths, SPEC, cache_dir=tmp_path, workers=1)

    def no_decoding(*args: object) -> int:
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "_fill", no_decoding)
    again = build_cache(paths, SPEC, cache_dir=tmp_path, workers=1)
    assert again.file == first.file
    assert cache_key(paths, PreprocessSpec(size=32), None) != cache_key(paths, SPEC, None)
    assert cache_key(paths, SPEC, 96) != cache_key(paths, SPEC, None)  # the decode side is preprocessing too
    assert cache_key(paths, SPEC, None, digests=["a"] * 40) != cache_key(
        paths, SPEC, None, digests=["b"] * 40
    )
    with pytest.raises(AssertionError, match="decoded again"):
        build_cache(paths[:-1], SPEC, cache_dir=tmp_path, workers=1)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".u8"]  # no temp file left behind


def test_a_build_sweeps_the_temp_files_of_killed_builds_and_keeps_live_ones(
    photos: tuple[list[str], np.ndarray], tmp_path: Path
) -> None:
    """kill -9 or the OOM killer runs no ``except``: the next build on the folder removes what such a build left
    (this host, process gone) and leaves a running build's file (this host, process alive) and other hosts'."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    dead = tmp_path / f"k.u8.tmp-{host}-{int(gone.stdout)}"
    live = tmp_path / f"k.u8.tmp-{host}-{os.getppid()}"
    other = tmp_path / f"k.u8.tmp-elsewhere-{int(gone.stdout)}"
    for f in (dead, live, other):
        f.write_bytes(b"\0" * 64)
    paths, _ = photos
    build_cache(paths[:4], SPEC, cache_dir=tmp_path, workers=1)
    assert not dead.exists() and live.exists() and other.exists()


def test_reading_does_not_map_the_file_and_a_temporary_cache_is_removed(
    photos: tuple[list[str], np.ndarray],
) -> None:
    """Mapped pages that were touched count in RSS; pread-ing rows keeps RSS flat in the number of images."""
    paths, _ = photos
    images = build_cache(paths, SPEC, workers=1)
    for i in range(0, 40, 8):
        images[np.arange(i, i + 8)]
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert images.file not in maps.read_text()
    clone = pickle.loads(pickle.dumps(images))  # what a spawned DataLoader worker gets: its own handle
    np.testing.assert_array_equal(clone[[3]], images[[3]])
    folder = Path(images.file).parent
    images.close()
    assert not folder.exists()


def test_disk_images_reject_nothing_silently(tmp_path: Path) -> None:
    f = tmp_path / "x.u8"
    f.write_bytes(bytes(range(12)) * 2)
    im = DiskImages(f, 2, 2)
    assert im[[1]].tolist() == [[[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]]


def _fit(photos: tuple[list[str], np.ndarray], **kw: object) -> list[float]:
    pytest.importorskip("lightning_fabric")
    from roadwork.config import ModelConfig, TrainConfig
    from roadwork.training.loop import train_model

    paths, labels = photos
    model = ModelConfig(backbone="test_vit", image_size=32, drop_rate=0.0, kwargs={"img_size": 32})
    cfg = TrainConfig(**({"epochs": 1, "batch_size": 8, "accelerator": "cpu"} | kw))  # type: ignore[arg-type]
    res = train_model(
        model,
        cfg,
        classes=["a", "b"],
        train_paths=paths,
        train_labels=labels,
        val_paths=paths[:8],
        val_labels=labels[:8],
        progress=False,
    )
    return [r["train_loss"] for r in res.history] + [r["val_loss"] for r in res.history]


def test_training_from_disk_from_ram_and_with_workers_is_the_same(
    photos: tuple[list[str], np.ndarray],
) -> None:
    pytest.importorskip("torch")
    assert _fit(photos, cache="disk") == _fit(photos, cache="memory")  # light: the loop's generator
    one = _fit(photos, augment="standard", workers=1, decode_workers=1)
    assert one == _fit(
        photos, augment="standard", workers=2, decode_workers=2
    )  # forked decoders + DataLoader


def test_a_second_training_run_reuses_the_cache_keyed_on_content(
    photos: tuple[list[str], np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.cache_dir + the images' sha256 (what stage_train passes from dataset.parquet): the second run, and
    a run on the same bytes under other paths, decode nothing; other preprocessing decodes again."""
    pytest.importorskip("lightning_fabric")
    import hashlib
    import shutil

    from roadwork.config import ModelConfig, TrainConfig
    from roadwork.training.loop import train_model

    paths, labels = photos
    decoded: list[int] = []
    fill = cache_mod._fill
    monkeypatch.setattr(cache_mod, "_fill", lambda *a: decoded.append(len(a[3])) or fill(*a))
    moved = tmp_path / "moved"
    moved.mkdir()
    moved_paths = [shutil.copy(p, moved / f"copy-{Path(p).name}") for p in paths]
    sha = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]

    def fit(image_size: int, where: list[str]) -> None:
        model = ModelConfig(
            backbone="test_vit", image_size=image_size, drop_rate=0.0, kwargs={"img_size": 32}
        )
        cfg = TrainConfig(  # decoded in this process, so the patched _fill counts every decode
            epochs=1, batch_size=8, accelerator="cpu", decode_workers=1, cache_dir=str(tmp_path / "cache")
        )
        train_model(
            model,
            cfg,
            classes=["a", "b"],
            train_paths=where,
            train_labels=labels,
            val_paths=where[:8],
            val_labels=labels[:8],
            progress=False,
            train_digests=sha,
            val_digests=sha[:8],
        )

    fit(32, paths)
    assert sum(decoded) == len(paths) + 8  # train and val decoded once
    fit(32, paths)
    fit(32, [str(p) for p in moved_paths])  # same bytes elsewhere: keyed on content, not paths
    assert sum(decoded) == len(paths) + 8
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 2
    fit(48, paths)  # other preprocessing, other key
    assert sum(decoded) == 2 * (len(paths) + 8)
