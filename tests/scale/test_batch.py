"""Batch prediction: local streaming and Ray Data give identical outputs, both resume, the CLI drives both."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from roadwork.scale.batch import identical, list_images, predict_local, read_predictions


@pytest.fixture(scope="module")
def items(tiny_run):
    _, result = tiny_run
    images = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:40]
    return pd.DataFrame({"path": [str(p) for p in images], "weather": ["fog", "rain"] * 20})


def test_local_streams_in_parts_and_resumes(tiny_run, items, tmp_path):
    _, result = tiny_run
    out = tmp_path / "preds"
    assert predict_local(result.bundle, items.iloc[:15], out, batch_size=4, part_rows=8, progress=False) == 15
    assert len(list(out.glob("*.parquet"))) == 2 and not list(out.glob(".*"))
    assert (
        predict_local(result.bundle, items, out, batch_size=4, part_rows=8, progress=False) == 25
    )  # resumed
    df = read_predictions(out)
    assert len(df) == 40 and df["path"].is_unique and set(df["weather"]) == {"fog", "rain"}
    assert {"label", "probability", "prediction_set", "abstain", "stage"} <= set(df.columns)
    assert predict_local(result.bundle, items, out, progress=False) == 0


def test_ray_gives_the_same_rows_as_local(tiny_run, items, tmp_path):
    ray = pytest.importorskip("ray")
    from roadwork.scale.batch import predict_ray

    _, result = tiny_run
    predict_local(result.bundle, items, tmp_path / "local", batch_size=8, progress=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert predict_ray(result.bundle, items.iloc[:10], tmp_path / "ray", batch_size=8, actors=2) == 10
        assert predict_ray(result.bundle, items, tmp_path / "ray", batch_size=8, actors=2) == 30  # resumed
    finally:
        ray.shutdown()
    a, b = read_predictions(tmp_path / "local"), read_predictions(tmp_path / "ray")
    assert identical(a, b[a.columns])


def test_sources_and_cli(tiny_run, items, tmp_path, capsys):
    from roadwork.cli import main

    _, result = tiny_run
    manifest = tmp_path / "m.csv"
    items.assign(path=[p.split("/")[-1] for p in items["path"]]).to_csv(manifest, index=False)
    (tmp_path / "imgs").mkdir()
    for p in items["path"][:3]:
        (tmp_path / "imgs" / p.split("/")[-1]).write_bytes(Path(p).read_bytes())
    listed = list_images([tmp_path / "imgs", manifest])
    assert len(listed) == 40 + 3 and listed["path"].is_unique
    # a path that does not exist is a row: the predictor lists it as unreadable, as a manifest's missing file
    assert list_images([tmp_path / "nope"])["path"].tolist() == [str(tmp_path / "nope")]
    assert (
        main(["predict", str(result.bundle), str(tmp_path / "imgs"), f"out={tmp_path / 'o'}", "batch=2"]) == 0
    )
    assert "predicted 3 images" in capsys.readouterr().out
    assert len(read_predictions(tmp_path / "o")) == 3
    assert main(["predict", str(result.bundle), str(tmp_path / "imgs"), "engine=ray"]) == 2
    (tmp_path / "afile").write_text("x")
    assert main(["predict", str(result.bundle), str(tmp_path / "imgs"), f"out={tmp_path / 'afile'}"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["predict", str(result.bundle), str(tmp_path / "imgs"), "engine=spark", "out=x"]) == 2


def test_ray_keeps_the_manifests_label_and_uses_no_deprecated_api(tiny_run, items, tmp_path):
    ray = pytest.importorskip("ray")
    import logging

    from roadwork.scale.batch import predict_ray

    _, result = tiny_run
    manifest = tmp_path / "m.csv"
    truth = ["roadwork", "no_roadwork"] * 5
    items.iloc[:10].assign(label=truth, split="test").to_csv(manifest, index=False)
    listed = list_images([manifest])
    assert list(listed["true_label"]) == truth and "split" not in listed.columns
    predict_local(result.bundle, listed, tmp_path / "local", batch_size=4, progress=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        said: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
        ray_data = logging.getLogger("ray.data")  # Ray logs its deprecations (e.g. concurrency=, 2.51)
        ray_data.addHandler(handler)
        try:
            assert predict_ray(result.bundle, listed, tmp_path / "ray", batch_size=4, actors=2) == 10
        finally:
            ray_data.removeHandler(handler)
        assert not [m for m in said if "deprecated" in m], said
    finally:
        ray.shutdown()
    a, b = read_predictions(tmp_path / "local"), read_predictions(tmp_path / "ray")
    assert identical(a, b[a.columns]) and "true_label" in b.columns
    assert b.set_index("path").loc[listed["path"], "true_label"].tolist() == truth


@pytest.fixture
def messy_images(tiny_run, tmp_path):
    """30 good images and 4 unreadable ones (empty, truncated, not an image, a fake PNG) in one folder."""
    _, result = tiny_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:30]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    data = good[0].read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(data[:40])
    (folder / "notes.png").write_text("not an image")
    (folder / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return folder, {p.name for p in good}, {"empty.jpg", "truncated.jpg", "notes.png", "fake.png"}


def test_unreadable_images_are_skipped_with_a_reason_and_the_rest_predicted(tiny_run, messy_images, tmp_path):
    from roadwork.cli import main
    from roadwork.scale.batch import read_skipped

    _, result = tiny_run
    folder, good, bad = messy_images
    out = tmp_path / "o"
    assert main(["predict", str(result.bundle), str(folder), f"out={out}", "batch=8"]) == 0
    df, skipped = read_predictions(out), read_skipped(out)
    assert {Path(p).name for p in df["path"]} == good and len(df) == len(good)
    assert {Path(p).name for p in skipped["path"]} == bad
    assert all(skipped["reason"].str.len() > 0) and df["sha256"].str.len().eq(64).all()
    import pandas as pd

    assert len(pd.read_parquet(out)) == len(good)  # the skipped list does not break reading the folder
    # a rerun predicts nothing again, tries the bad ones again, and lists them once
    assert predict_local(result.bundle, list_images([folder]), out, progress=False) == 0
    assert len(read_skipped(out)) == len(bad) and len(read_predictions(out)) == len(good)


def test_resume_keys_on_content_not_path(tiny_run, messy_images, tmp_path):
    _, result = tiny_run
    folder, good, _bad = messy_images
    out = tmp_path / "o"
    items = list_images([folder])
    predict_local(result.bundle, items.iloc[:12], out, batch_size=4, progress=False)
    moved = tmp_path / "moved"
    folder.rename(moved)  # the same images under another path: nothing is predicted twice
    items = list_images([moved])
    first = read_predictions(out)
    n = predict_local(result.bundle, items, out, batch_size=4, progress=False)
    df = read_predictions(out)
    assert n == len(good) - len(first)  # only the images not predicted under the old path
    assert df["sha256"].is_unique and len(df) == len(good)
    dup = moved / "copy-of-first.jpg"  # a second copy of one content is a row of its own
    dup.write_bytes((moved / sorted(good)[0]).read_bytes())
    assert predict_local(result.bundle, list_images([moved]), out, progress=False) == 1
    assert len(read_predictions(out)) == len(good) + 1


def test_kill_9_mid_run_then_rerun_gives_every_row_once(tiny_run, messy_images, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from roadwork.scale.batch import read_skipped

    _, result = tiny_run
    folder, good, bad = messy_images
    out = tmp_path / "o"
    script = f"""
import time
import roadwork.scale.batch as b
real = b.BundlePredictor.__call__
def slow(self, batch):
    time.sleep(0.3)  # slow enough to be killed half-way
    return real(self, batch)
b.BundlePredictor.__call__ = slow
b.predict_local({str(result.bundle)!r}, b.list_images([{str(folder)!r}]), {str(out)!r}, batch_size=2,
                part_rows=4, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 2:  # some parts written, most of the job still to do
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = len(read_predictions(out))
    assert 0 < before < len(good)
    predict_local(result.bundle, list_images([folder]), out, batch_size=4, progress=False)
    df = read_predictions(out)
    assert df["path"].is_unique and {Path(p).name for p in df["path"]} == good
    assert {Path(p).name for p in read_skipped(out)["path"]} == bad


def test_both_engines_load_the_bundles_selected_variant(monkeypatch, tmp_path):
    """roadwork predict serves what roadwork bench selected (variant=auto), as the server does."""
    import inspect

    import roadwork.export.bundle as bundle_mod
    from roadwork.scale.batch import BundlePredictor, predict_local, predict_ray

    seen = {}

    def fake_load(path, *, threads=0, variant="fp32", require_signature=None):  # type: ignore[no-untyped-def]
        seen.update(path=path, threads=threads, variant=variant)
        return object()

    monkeypatch.setattr(bundle_mod.Bundle, "load", staticmethod(fake_load))
    BundlePredictor(str(tmp_path), threads=1)
    assert seen == {"path": str(tmp_path), "threads": 1, "variant": "auto"}
    BundlePredictor(str(tmp_path), variant="int8")
    assert seen["variant"] == "int8"
    for engine in (predict_local, predict_ray):
        assert inspect.signature(engine).parameters["variant"].default == "auto"


def test_the_cli_counts_this_runs_images_after_a_move(tiny_run, messy_images, tmp_path, capsys):
    """A rerun on the moved folder: every good image already there, every bad one unreadable, counted once."""
    from roadwork.cli import main

    _, result = tiny_run
    folder, good, bad = messy_images
    out = tmp_path / "o"
    assert main(["predict", str(result.bundle), str(folder), f"out={out}"]) == 0
    moved = tmp_path / "moved"
    folder.rename(moved)
    capsys.readouterr()
    assert main(["predict", str(result.bundle), str(moved), f"out={out}"]) == 0
    said = capsys.readouterr().out
    assert f"predicted 0 images ({len(good)} already in {out}, {len(bad)} unreadable" in said


def test_predict_reads_odd_names_names_empty_cells_and_predicts_every_good_image(tiny_run, tmp_path, capsys):
    """A file name that is not UTF-8 (another system's encoding), in a folder or a Latin-1 manifest, is a good
    image: predicted, its path written with the odd bytes as \\xNN; an empty manifest cell is named and skipped."""
    import json
    import os

    from roadwork.cli import main
    from roadwork.scale.batch import read_skipped

    _, result = tiny_run
    images = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for im in images:
        (folder / im.name).write_bytes(im.read_bytes())
    with open(os.path.join(os.fsencode(folder), b"stra\xdfe.jpg"), "wb") as f:  # Latin-1 'straße'
        f.write(images[0].read_bytes())
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:  # Latin-1 'café'
        f.write(images[2].read_bytes())
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["", str(images[1])], "weather": ["fog", "rain"]}).to_csv(manifest, index=False)
    with open(manifest, "ab") as f:  # a row written in Latin-1: the file it names is read
        f.write(b"caf\xe9.jpg,sun\n")
    assert main(["predict", str(result.bundle), str(folder), str(manifest)]) == 0
    out, err = capsys.readouterr()
    rows = {r["path"]: r for r in map(json.loads, out.splitlines())}
    odd = {str(folder / "stra\\xdfe.jpg"), str(tmp_path / "caf\\xe9.jpg")}
    assert len(rows) == 6 and odd <= set(rows) and rows[str(tmp_path / "caf\\xe9.jpg")]["weather"] == "sun"
    assert (
        rows[str(folder / "stra\\xdfe.jpg")]["probability"]
        == rows[str(folder / images[0].name)]["probability"]
    )
    assert "skipped manifest m.csv row 2: empty path" in err and "not valid UTF-8" not in err
    o = tmp_path / "o"
    assert main(["predict", str(result.bundle), str(folder), str(manifest), f"out={o}"]) == 0
    df = read_predictions(o)
    assert len(df) == 6 and odd <= set(df["path"]) and not len(read_skipped(o))
    capsys.readouterr()
    assert main(["predict", str(result.bundle), str(folder), str(manifest), f"out={o}"]) == 0  # resumed
    assert "predicted 0 images (6 already in" in capsys.readouterr().out and len(read_predictions(o)) == 6


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
def test_a_fifo_and_a_link_to_dev_zero_are_listed_never_opened(tiny_run, tmp_path):
    """`mkfifo a.jpg` blocked the image's open (and out=DIR's hashing) forever; a `z.jpg` link to /dev/zero
    hashed forever. In a child process, so that the old behaviour fails at the timeout instead of hanging."""
    import os
    import subprocess

    from roadwork.scale.batch import read_skipped

    _, result = tiny_run
    folder = tmp_path / "in"
    folder.mkdir()
    for im in sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:3]:
        (folder / im.name).write_bytes(im.read_bytes())
    os.mkfifo(folder / "a.jpg")
    (folder / "z.jpg").symlink_to("/dev/zero")
    predict = [sys.executable, "-m", "roadwork.cli", "predict", str(result.bundle), str(folder)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    lines = subprocess.run(predict, capture_output=True, text=True, timeout=300, env=env)
    assert lines.returncode == 0 and len(lines.stdout.splitlines()) == 3, lines.stderr[-2000:]
    assert f"skipped {folder / 'a.jpg'}: not a regular file (a FIFO)" in lines.stderr
    assert f"skipped {folder / 'z.jpg'}: not a regular file (a character device)" in lines.stderr
    o = tmp_path / "o"
    batch = subprocess.run([*predict, f"out={o}"], capture_output=True, text=True, timeout=300, env=env)
    assert batch.returncode == 0, batch.stderr[-2000:]
    assert len(read_predictions(o)) == 3 and "2 unreadable" in batch.stdout
    assert {Path(p).name for p in read_skipped(o)["path"]} == {"a.jpg", "z.jpg"}


def test_an_image_over_the_size_limit_is_listed_not_read(tiny_run, tmp_path, monkeypatch):
    import roadwork.scale.batch as batch

    _, result = tiny_run
    image = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[0]
    big = tmp_path / "big.jpg"
    big.write_bytes(image.read_bytes() + b"\0" * 64)  # a readable JPEG, one byte over the limit is enough
    monkeypatch.setattr(batch, "_MAX_BYTES", image.stat().st_size)
    out = tmp_path / "o"
    assert predict_local(result.bundle, list_images([image, big]), out, progress=False) == 1
    skipped = batch.read_skipped(out)
    assert skipped["path"].tolist() == [str(big)] and skipped["reason"][0].startswith("file too large (")
    assert skipped["sha256"].tolist() == [""]  # not hashed either: nothing over the limit is read


def test_a_missing_path_named_explicitly_is_listed_and_the_others_predicted(tiny_run, tmp_path, capsys):
    """As a manifest row naming a missing file: listed, not the end of the job; exit 2 only when nothing is left."""
    import json

    from roadwork.cli import main
    from roadwork.scale.batch import read_skipped

    _, result = tiny_run
    good = str(sorted((result.run_dir / "data" / "images").glob("*.jpg"))[0])
    missing = str(tmp_path / "missing.jpg")
    assert main(["predict", str(result.bundle), good, missing]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["path"] for line in out.splitlines()] == [good]
    assert f"skipped {missing}: unreadable: No such file or directory" in err
    assert main(["predict", str(result.bundle), good, missing, f"out={tmp_path / 'o'}"]) == 0
    assert read_predictions(tmp_path / "o")["path"].tolist() == [good]
    assert read_skipped(tmp_path / "o")["path"].tolist() == [missing]
    capsys.readouterr()
    assert main(["predict", str(result.bundle), missing]) == 2  # nothing at all could be predicted
    assert "error: none of the 1 images could be read" in capsys.readouterr().err


def test_a_malformed_manifest_is_one_error_line_and_writes_nothing(tiny_run, tmp_path, capsys):
    from roadwork.cli import main

    _, result = tiny_run
    manifest = tmp_path / "m.csv"
    manifest.write_text('path,weather\na.jpg,fog\n"b.jpg,rain\n')  # an unterminated quote
    assert main(["predict", str(result.bundle), str(manifest), f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: manifest {str(manifest)!r} is not a valid CSV file (")
        and "Traceback" not in err
    )
    assert "fix that row" in err and not (tmp_path / "o").exists()


def test_tiff_gif_and_16_bit_images_in_a_folder_are_predicted_like_their_8_bit_versions(tiny_run, tmp_path):
    """.tif/.tiff/.gif files in a folder were ignored (neither predicted nor listed); a 16-bit greyscale photo was
    decoded ~99 % white. Now each is predicted, the 16-bit one exactly as its 8-bit version."""
    import numpy as np
    from PIL import Image

    from roadwork.scale.batch import BundlePredictor

    _, result = tiny_run
    photo = Image.open(sorted((result.run_dir / "data" / "images").glob("*.jpg"))[0]).convert("RGB")
    folder = tmp_path / "in"
    folder.mkdir()
    photo.save(folder / "rgb.tif")
    photo.save(folder / "rgb.tiff")
    photo.convert("P").save(folder / "palette.gif")
    grey = np.asarray(photo.convert("L"))
    Image.fromarray(grey).save(folder / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.tif")
    items = list_images([folder])
    assert len(items) == 6
    rows = BundlePredictor(str(result.bundle))(items).set_index("path")
    assert (rows["skip_reason"] == "").all()
    for name in ("grey16.png", "grey16.tif"):
        a, b = rows.loc[str(folder / name)], rows.loc[str(folder / "grey8.png")]
        assert a["probability"] == b["probability"] and a["label"] == b["label"]


def test_a_full_disk_is_one_error_line_and_leaves_no_temporary_part(tiny_run, tmp_path, monkeypatch, capsys):
    import errno

    from roadwork.cli import main

    _, result = tiny_run
    images = sorted((result.run_dir / "data" / "images").glob("*.jpg"))[:3]

    def full(self, path, *a, **k):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"PAR1 half")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    out = tmp_path / "out"
    assert main(["predict", str(result.bundle), *map(str, images), f"out={out}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: No space left on device writing ") and "Traceback" not in "\n".join(err)
    assert not list(out.glob(".part-*")) and not list(out.glob("part-*"))
