from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadwork.errors import RoadworkWarning

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-roadwork-mini"


def tiny_overrides(root: Path, name: str = "tiny", **extra: object) -> list[str]:
    """A configuration small enough to train and export in seconds on one core."""
    base = {
        "name": name,
        "root": str(root),
        "data.synthetic.n": 400,
        "data.synthetic.workers": 1,
        "data.min_per_class": 5,
        "model.backbone": "test_resnet",
        "model.image_size": 64,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.lr": 0.002,
        "export.parity_samples": 8,
        # the TorchScript exporter takes ~1 s where torch.export takes ~15 s per network (three per run); the
        # shared tiny_run keeps the default, and tests/models/test_heads.py checks both exporters' parity
        "export.exporter": "legacy",
        "evaluate.n_examples": 4,
        "tracking.enabled": False,
        # a tiny model would keep no early stage; the cascade tests need all three (selection: tests/trust)
        "cascade.select_stages": False,
        # the demo's cascade.enabled=auto turns the cascade off on 400 images (too few gate rows to certify it)
        "cascade.enabled": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """One tiny end-to-end run shared by the pipeline, export and evaluation tests."""
    from roadwork.config import load_config
    from roadwork.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("demo", tiny_overrides(root, **{"tracking.enabled": True, "export.exporter": "dynamo"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoadworkWarning)  # a tiny model may certify nothing; that is correct
        return cfg, run_pipeline(cfg, progress=False)


def _jpeg(rng: np.random.Generator, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("roadwork", "no_roadwork"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(rng))
    good = _jpeg(rng)
    (tmp_path / "roadwork" / "dup_a.jpg").write_bytes(good)
    (tmp_path / "roadwork" / "dup_b.jpg").write_bytes(good)
    (tmp_path / "roadwork" / "empty.jpg").write_bytes(b"")
    (tmp_path / "roadwork" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "no_roadwork" / "notes.txt").write_text("not an image")
    (tmp_path / "no_roadwork" / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, format="PNG")  # tiny file, many pixels
    (tmp_path / "no_roadwork" / "bomb.png").write_bytes(big.getvalue())
    return tmp_path


@pytest.fixture
def returns_unblocked():
    """``call(fn, fifos)``: ``fn()`` in a thread, its result returned (its exception raised). A hang guard for
    tests of FIFOs, not a time limit on the work: if ``fn`` has not returned after a generous wait it is blocked
    on one of ``fifos``, which are then opened for writing and closed (the reader gets end-of-file, the thread
    ends) and the test fails."""
    import threading

    def call(fn, fifos=()):  # type: ignore[no-untyped-def]
        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # raised again in the test's thread
                box["error"] = e

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(120)
        if thread.is_alive():
            for fifo in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(30)
            pytest.fail(f"{fn} blocked on a FIFO ({', '.join(map(str, fifos))}) instead of refusing it")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box.get("result")

    return call
