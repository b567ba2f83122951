from __future__ import annotations

import os

import pandas as pd
import pytest

from roadwork.config import DataConfig
from roadwork.data.sources import build_dataset
from roadwork.errors import DataError


def test_bad_files_are_skipped_with_reasons(messy_folder):
    cfg = DataConfig(source=str(messy_folder), max_pixels=4_000_000, min_per_class=5)
    df, classes, report = build_dataset(cfg)
    assert classes == ["no_roadwork", "roadwork"]
    reasons = {r["id"]: r["reason"] for r in report.skipped}
    assert set(reasons) == {
        "roadwork/empty.jpg",
        "roadwork/truncated.jpg",
        "no_roadwork/notes.txt",
        "no_roadwork/fake.png",
        "no_roadwork/bomb.png",
    }
    assert reasons["roadwork/empty.jpg"] == "zero-byte file"
    assert reasons["no_roadwork/notes.txt"] == "not an image"
    assert "corrupt" in reasons["roadwork/truncated.jpg"]
    assert "decompression bomb" in reasons["no_roadwork/bomb.png"]
    assert report.duplicates == [["roadwork/dup_a.jpg", "roadwork/dup_b.jpg"]]
    assert len(df) == report.n_used == 26 and report.n_found == 31
    # exact duplicates share a split: no leakage between train and test
    assert df.loc[df["id"].str.startswith("roadwork/dup"), "split"].nunique() == 1


def test_checking_in_worker_processes_gives_the_same_table_and_reasons(messy_folder, monkeypatch):
    import roadwork.data.sources as sources

    monkeypatch.setattr(sources, "_CHECK_CHUNK", 4)  # 31 files: 8 tasks over 2 forked processes
    kw = {"source": str(messy_folder), "max_pixels": 4_000_000, "min_per_class": 5}
    one_df, _, one = build_dataset(DataConfig(**kw, workers=1))
    two_df, _, two = build_dataset(DataConfig(**kw, workers=2))
    pd.testing.assert_frame_equal(one_df, two_df)
    assert one.to_dict() == two.to_dict() and len(one.skipped) == 5


def test_too_few_images_per_class_says_how_many_are_needed(messy_folder):
    with pytest.raises(
        DataError, match=r"'no_roadwork' has 13, 'roadwork' has 14.*at least data.min_per_class=20"
    ):
        build_dataset(DataConfig(source=str(messy_folder), min_per_class=20))


def test_manifest_with_slices_and_relative_paths(messy_folder):
    rows = [
        {"path": f"roadwork/{i}.jpg", "label": "roadwork", "city": "a" if i % 2 else "b"} for i in range(12)
    ]
    rows += [{"path": f"no_roadwork/{i}.jpg", "label": "no_roadwork", "city": "a"} for i in range(12)]
    pd.DataFrame(rows).to_csv(messy_folder / "m.csv", index=False)
    df, _classes, report = build_dataset(DataConfig(source=str(messy_folder / "m.csv"), min_per_class=5))
    assert len(df) == 24 and "city" in df.columns and not report.skipped
    assert set(df["city"]) == {"a", "b"}


def test_manifest_without_label_column_is_explained(tmp_path):
    (tmp_path / "m.csv").write_text("path,klass\na.jpg,x\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['label'\]"):
        build_dataset(DataConfig(source=str(tmp_path / "m.csv")))


def test_missing_source_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist. Pass 'synthetic', an image folder"):
        build_dataset(DataConfig(source=str(tmp_path / "nope")))


def test_folder_and_manifest_listings_give_the_same_table_and_training_order(tmp_path):
    """The same files listed by a folder, by a manifest in listing order and by one in reverse order (absolute
    paths): the same rows in the same order, so the same training order and the same model."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    for cls in ("roadwork", "no_roadwork"):
        (root / cls).mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                root / cls / f"{i:02d}.png"
            )
    folder, _, _ = build_dataset(DataConfig(source=str(root), min_per_class=5, workers=1))
    listed = pd.DataFrame({"path": [str(root / i) for i in folder["id"]], "label": folder["label"]})
    listed.iloc[::-1].to_csv(tmp_path / "reversed.csv", index=False)
    listed.sample(frac=1, random_state=3).to_csv(tmp_path / "shuffled.csv", index=False)
    for name in ("reversed.csv", "shuffled.csv"):
        manifest, _, _ = build_dataset(DataConfig(source=str(tmp_path / name), min_per_class=5, workers=1))
        cols = ["path", "label", "split", "sha256"]
        pd.testing.assert_frame_equal(folder[cols], manifest[cols])
        train = [df.loc[df["split"] == "train", "path"].tolist() for df in (folder, manifest)]
        assert train[0] == train[1] and len(train[0]) > 5  # what train_model receives, in its order


def test_odd_names_and_empty_cells_are_skipped_and_named_not_the_end_of_the_job(messy_folder):
    """A file name that is not UTF-8 (written by another system) and manifest rows with an empty path or label:
    every good image is used, each odd entry is listed with its reason, in training and in prediction."""

    from roadwork.data.listing import list_images

    good = (messy_folder / "roadwork" / "0.jpg").read_bytes()
    odd = os.path.join(os.fsencode(messy_folder / "roadwork"), b"caf\xe9.jpg")  # Latin-1 'café'
    with open(odd, "wb") as f:
        f.write(good)
    df, _, report = build_dataset(DataConfig(source=str(messy_folder), max_pixels=4_000_000, min_per_class=5))
    reasons = {r["id"]: r["reason"] for r in report.skipped}
    # the dataset table stores paths as UTF-8 text: the data stage lists the file, roadwork predict reads it
    assert (
        "not valid UTF-8" in reasons["roadwork/caf\\xe9.jpg"] and "rename" in reasons["roadwork/caf\\xe9.jpg"]
    )
    assert len(df) == 26
    listed = list_images([messy_folder / "roadwork"])
    assert len(listed) == 17 and os.fsdecode(odd) in set(listed["path"]) and not listed.attrs["skipped"]

    rows = [{"path": f"roadwork/{i}.jpg", "label": "roadwork"} for i in range(12)]
    rows += [{"path": f"no_roadwork/{i}.jpg", "label": "no_roadwork"} for i in range(12)]
    rows += [{"path": "", "label": "roadwork"}, {"path": "roadwork/1.jpg", "label": ""}]
    pd.DataFrame(rows).to_csv(messy_folder / "m.csv", index=False)
    df, _, report = build_dataset(DataConfig(source=str(messy_folder / "m.csv"), min_per_class=5))
    assert len(df) == 24
    assert [(r["id"], r["reason"].split(":")[0]) for r in report.skipped] == [
        ("row 26", "empty path"),
        ("row 27", "empty label"),
    ]
    listed = list_images([messy_folder / "m.csv"])
    assert len(listed) == 24 and listed.attrs["skipped"] == [  # roadwork/1.jpg twice: listed once
        {"path": "manifest m.csv row 26", "reason": "empty path: give every row a path"}
    ]


def test_fifos_and_device_links_in_a_folder_are_listed_with_a_reason_not_opened(
    messy_folder, returns_unblocked
):
    """A FIFO named like an image would block the check's open forever; a link to /dev/zero would never end. Both
    are listed as unusable with why, like a corrupt file, and every good image is used."""

    fifo = messy_folder / "roadwork" / "a.jpg"
    os.mkfifo(fifo)
    (messy_folder / "no_roadwork" / "z.jpg").symlink_to("/dev/zero")
    cfg = DataConfig(source=str(messy_folder), max_pixels=4_000_000, min_per_class=5, workers=1)
    df, _, report = returns_unblocked(lambda: build_dataset(cfg), [fifo])
    reasons = {r["id"]: r["reason"] for r in report.skipped}
    assert reasons["roadwork/a.jpg"] == "not a regular file (a FIFO); only regular files are read"
    assert reasons["no_roadwork/z.jpg"].startswith("not a regular file (a character device)")
    assert len(df) == 26 and report.n_found == 33


def test_a_manifest_that_is_a_fifo_is_refused_not_waited_on(tmp_path, returns_unblocked):

    fifo = tmp_path / "m.csv"
    os.mkfifo(fifo)
    with pytest.raises(
        DataError, match=r"data.source='.*m\.csv': manifest .* cannot be used \(not a regular file"
    ):
        returns_unblocked(lambda: build_dataset(DataConfig(source=str(fifo))), [fifo])


def test_an_image_the_decode_refuses_is_skipped_by_the_data_stage_too(messy_folder):
    """A float TIFF outside [0, 1] has no defined brightness: the shared decode refuses it, so the data stage lists
    it rather than passing it on to a training that would stop on it."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((24, 24), 200.0, np.float32)).save(messy_folder / "roadwork" / "f.tif")
    _, _, report = build_dataset(DataConfig(source=str(messy_folder), max_pixels=4_000_000, min_per_class=5))
    reasons = {r["id"]: r["reason"] for r in report.skipped}
    assert "only [0, 1] has a defined brightness" in reasons["roadwork/f.tif"]
