"""What ``roadwork predict`` lists: every suffix the decoder reads, any file name the system gives, a missing file
named explicitly as a row to report, and manifests that are not regular files or not valid CSV/Parquet refused
with our error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork.data.listing import IMAGE_SUFFIXES, list_images, read_manifest, shown
from roadwork.data.preprocess import load_rgb
from roadwork.errors import InputError

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, /dev/zero and byte names are POSIX")


def _image(path: Path | bytes, seed: int = 0) -> None:
    im = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    fmt = Image.registered_extensions()[os.path.splitext(os.fsdecode(path))[1].lower()]
    with open(path, "wb") as f:
        im.save(f, format=fmt)


def test_a_folder_lists_every_suffix_the_decoder_reads(tmp_path: Path) -> None:
    assert {".tif", ".tiff", ".gif"} <= IMAGE_SUFFIXES
    for i, suffix in enumerate(sorted(IMAGE_SUFFIXES)):
        _image(tmp_path / f"{i}{suffix.upper() if i % 2 else suffix}", seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.jpg").mkdir()  # a folder named like an image is a folder, not an image
    listed = list_images([tmp_path])
    assert len(listed) == len(IMAGE_SUFFIXES)
    for p in listed["path"]:
        assert load_rgb(p).size == (24, 20)  # what is listed, the one decode path reads


@posix_only
def test_a_name_that_is_not_utf8_is_listed_and_read_and_shown_escaped(tmp_path: Path) -> None:
    odd = os.path.join(os.fsencode(tmp_path), b"stra\xdfe.jpg")  # Latin-1 'straße'
    _image(odd)
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,weather\nstra\xdfe.jpg,sun\xe9\n")  # a Latin-1 manifest naming it
    for source in (tmp_path, manifest):
        listed = list_images([source])
        assert listed["path"].tolist() == [os.fsdecode(odd)] and not listed.attrs["skipped"]
        assert load_rgb(listed["path"][0]).size == (24, 20)
        assert shown(listed["path"][0]) == str(tmp_path / "stra\\xdfe.jpg")
    assert list_images([manifest])["weather"].tolist() == ["sun\\xe9"]


def test_a_missing_path_named_explicitly_is_a_row_for_the_reader_to_report(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    listed = list_images([tmp_path / "a.jpg", tmp_path / "missing.jpg", tmp_path / "nope"])
    assert listed["path"].tolist() == [str(tmp_path / n) for n in ("a.jpg", "missing.jpg", "nope")]
    with pytest.raises(InputError, match=r"manifest '.*missing\.csv' cannot be used \(unreadable: No such"):
        list_images([tmp_path / "a.jpg", tmp_path / "missing.csv"])


def test_a_malformed_manifest_is_our_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text('path,weather\na.jpg,fog\n"b.jpg,rain\n')  # an unterminated quote
    with pytest.raises(
        InputError, match=r"manifest '.*m\.csv' is not a valid CSV file \(.*EOF inside string"
    ):
        list_images([bad])
    (tmp_path / "m.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"manifest '.*m\.parquet' is not a valid Parquet file"):
        list_images([tmp_path / "m.parquet"])
    (tmp_path / "e.csv").write_bytes(b"")
    with pytest.raises(InputError, match=r"manifest '.*e\.csv' cannot be used \(zero-byte file\)"):
        read_manifest(tmp_path / "e.csv")


@posix_only
def test_a_manifest_that_is_not_a_regular_file_is_refused_not_read(tmp_path: Path) -> None:
    """A FIFO waits for a writer, /dev/zero never ends: both are refused before any read. In a child process,
    so that the old behaviour (hanging, or reading zeros into memory) fails at the timeout instead of hanging."""
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    (tmp_path / "zero.parquet").symlink_to("/dev/zero")
    code = f"""
from pathlib import Path
from roadwork.data.listing import list_images
from roadwork.errors import InputError
for name in ("fifo.csv", "zero.csv", "zero.parquet"):
    try:
        list_images([Path({str(tmp_path)!r}) / name])
    except InputError as e:
        print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stderr[-2000:]
    assert "fifo.csv' cannot be used (not a regular file (a FIFO)" in lines[0]
    assert all(
        "(a character device)" in line and "pass a regular .csv or .parquet" in line for line in lines[1:]
    )


def test_a_parquet_manifest_keeps_its_columns(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    pd.DataFrame({"path": ["a.png"], "label": ["x"], "split": ["test"]}).to_parquet(tmp_path / "m.parquet")
    listed = list_images([tmp_path / "m.parquet"])
    assert listed.to_dict("records") == [{"path": str(tmp_path / "a.png"), "true_label": "x"}]
