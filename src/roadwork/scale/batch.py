"""Batch prediction: a bundle over a folder or manifest of images, into a Parquet dataset (a folder of part
files), locally or on a Ray cluster. Both engines run the whole ``TrustPolicy`` (and cascade) through
:meth:`Bundle.predict_images` on images decoded the same way, so their outputs are identical.

- ``local``: streams the images in chunks of ``batch_size`` and writes one part file per ``part_rows``
  predictions: memory stays bounded by one part, whatever the number of images; a progress bar shows the way.
- ``ray``: Ray Data — ``map_batches`` with an actor pool that loads the bundle once per actor; the small
  prediction rows stream back and are written as part files. On one machine the actors split the cores; on a
  cluster they spread over it.

Both skip unreadable images (corrupt, truncated, missing, not an image, over ``data.max_file_mb``'s default of
64 MiB, not a regular file: a FIFO or a link to ``/dev/zero`` is never opened) instead of stopping: each is listed
with its reason in ``_skipped.csv`` beside the parts, and every other image is predicted. Parts are flushed every
``part_rows`` rows (256) or ``flush_s`` seconds (10), whichever comes first, so a killed job loses little. A
``path`` written out (parts, ``_skipped.csv``) is :func:`~roadwork.data.listing.shown`: a file whose name is not
UTF-8 is predicted too, each undecodable byte of its name written ``\\xNN``.

Both resume, keyed on content: every row carries the image's ``sha256``, and a rerun skips as many images of
each content hash as the folder already holds (a moved or renamed folder resumes too; two copies of one image
are both predicted). Parts are written through a temporary name and a rename, so after ``kill -9`` and a rerun
there are no duplicate and no missing rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from roadwork.config import DataConfig
from roadwork.data.files import file_problem, open_regular
from roadwork.data.listing import list_images, shown
from roadwork.errors import InputError

__all__ = [
    "SKIPPED",
    "BundlePredictor",
    "identical",
    "list_images",
    "predict_local",
    "predict_ray",
    "read_predictions",
    "read_skipped",
]


def read_predictions(out: str | Path) -> pd.DataFrame:
    """Every part file of an output folder, one row per image, sorted by path."""
    parts = sorted(Path(out).glob("*.parquet")) if Path(out).is_dir() else []
    if not parts:
        return pd.DataFrame({"path": []})
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values(
        "path", ignore_index=True
    )


SKIPPED = "_skipped.csv"
"""Beside the parts; the leading underscore keeps it out of `pandas.read_parquet(out)` (pyarrow skips `_` files)."""


_MAX_BYTES = int(DataConfig().max_file_mb * 2**20)  # the data stage's default limit: larger files are listed


def _sha256(path: str) -> str:
    """The file's content hash; ``""`` when it cannot be read (the predictor then reports why): only a regular
    file of at most ``data.max_file_mb`` (default) is read, so a FIFO or ``/dev/zero`` never hangs it."""
    h = hashlib.sha256()
    try:
        with open_regular(path, max_bytes=_MAX_BYTES) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def _todo(items: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The rows of ``items`` not yet predicted into ``out``, each with its ``sha256``: a content hash that is
    already there as many times as it occurs here is done (parts written before hashes were kept match by path)."""
    if out.exists() and not out.is_dir():
        raise InputError(
            f"out={str(out)!r} is a file; batch prediction writes a folder of Parquet parts. Pass a new folder name."
        )
    items = items.drop(columns=[c for c in ("sha256",) if c in items.columns]).reset_index(drop=True)
    items.insert(1, "sha256", [_sha256(str(p)) for p in items["path"]])
    done = read_predictions(out) if out.is_dir() else pd.DataFrame({"path": []})
    if not len(done):
        return items
    hashed = done["sha256"] if "sha256" in done.columns else pd.Series([None] * len(done))
    left = Counter(h for h in hashed if isinstance(h, str) and h)
    done_paths = set(done.loc[hashed.isna() | (hashed == ""), "path"])  # as written: shown()
    keep = []
    for path, h in zip(items["path"], items["sha256"], strict=True):
        if h and left[h] > 0:
            left[h] -= 1
            keep.append(False)
        else:
            keep.append(shown(str(path)) not in done_paths)
    return items[keep].reset_index(drop=True)


class BundlePredictor:
    """Loads a bundle once and predicts a batch (a DataFrame with ``path`` and metadata columns). Used as is by
    the local engine and as the Ray actor class. ``variant``: the bundle's model variant, by default ``auto``:
    the one ``roadwork bench BUNDLE select=true`` recorded (fp32 without one), as the server serves it."""

    def __init__(
        self,
        bundle_dir: str,
        threads: int = 0,
        device: str = "cpu",
        variant: str = "auto",
        require_signature: str | None = None,
    ) -> None:
        from roadwork.export.bundle import Bundle
        from roadwork.export.onnx import execution_device

        with execution_device(device):
            self.bundle = Bundle.load(
                bundle_dir, threads=threads, variant=variant, require_signature=require_signature
            )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """One row per image of ``batch``: its predictions, or (unreadable) a ``skip_reason`` and no predictions.
        ``path`` comes back :func:`~roadwork.data.listing.shown` (storable text, whatever the file's name)."""
        from roadwork.export.bundle import open_image

        batch = batch.reset_index(drop=True)
        images, good, reasons = [], [], [""] * len(batch)
        for i, p in enumerate(batch["path"]):
            # not a regular file (a FIFO would block the open, /dev/zero never end) or too large: not opened
            reasons[i] = file_problem(str(p), max_bytes=_MAX_BYTES) or ""
            if reasons[i]:
                continue
            try:
                images.append(open_image(str(p), self.bundle.decode_side))
                good.append(i)
            except Exception as e:  # one unreadable file is reported, not the end of the job
                reasons[i] = str(e)[:500] or type(e).__name__
        rows = batch.iloc[good].reset_index(drop=True)
        meta = {
            c: rows[c].astype(str).tolist() for c in self.bundle.policy.slice_columns if c in rows.columns
        }
        recs = (
            pd.DataFrame(self.bundle.predict_images(images, meta or None).records(self.bundle.classes))
            if images
            else pd.DataFrame()
        )
        if images and "stage" not in recs.columns:  # which stage answered, as the server says it
            recs["stage"] = "model"
        recs.insert(0, "path", [shown(str(p)) for p in rows["path"]])
        for c in batch.columns:
            if c != "path":
                recs[c] = rows[c].astype(str).to_numpy()
        recs["skip_reason"] = ""
        bad = [i for i, r in enumerate(reasons) if r]
        if not bad:
            return recs
        skipped = batch.iloc[bad].reset_index(drop=True)
        skipped["path"] = [shown(str(p)) for p in skipped["path"]]
        skipped = skipped.astype(str)
        skipped["skip_reason"] = [shown(reasons[i]) for i in bad]
        return pd.concat([recs, skipped], ignore_index=True)


def _chunks(df: pd.DataFrame, n: int) -> Iterator[pd.DataFrame]:
    for i in range(0, len(df), n):
        yield df.iloc[i : i + n]


@contextlib.contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Parts:
    """Buffers predicted rows and writes them ``part_rows`` at a time, or when ``flush_s`` seconds have passed, as
    ``part-*.parquet`` (temp name + rename: a reader, or a resumed job, never sees half a file); rows with a
    ``skip_reason`` go to ``_skipped.csv`` instead (rewritten the same way at each flush)."""

    def __init__(
        self, out: Path, part_rows: int, flush_s: float = 10.0, retried: set[str] | None = None
    ) -> None:
        self.out, self.part_rows, self.flush_s = out, part_rows, flush_s
        self.buffer: list[pd.DataFrame] = []
        self.rows = 0
        self.last = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        old = out / SKIPPED
        # earlier runs' skipped files that this run tries again leave the list (they come back if still bad)
        self.skipped = pd.read_csv(old, dtype=str).fillna("") if old.is_file() else pd.DataFrame()
        if len(self.skipped) and retried:
            self.skipped = self.skipped[~self.skipped["path"].isin(retried)]
        self.new_skipped = 0

    def add(self, df: pd.DataFrame) -> None:
        bad = df["skip_reason"] != "" if "skip_reason" in df.columns else pd.Series(False, index=df.index)
        if bad.any():
            cols = ["path", "sha256", "skip_reason"]
            rows = df.loc[bad, [c for c in cols if c in df.columns]].rename(columns={"skip_reason": "reason"})
            self.skipped = pd.concat([self.skipped, rows], ignore_index=True)
            self.new_skipped += int(bad.sum())
        good = df.loc[~bad].drop(columns=["skip_reason"], errors="ignore")
        if len(good):
            self.buffer.append(good)
            self.rows += len(good)
        if self.rows >= self.part_rows or time.monotonic() - self.last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.buffer:
            part = pd.concat(self.buffer, ignore_index=True)
            tmp = self.out / f".part-{uuid.uuid4().hex}.tmp"
            with _removed_on_failure(tmp):  # a full disk leaves no half part behind
                part.to_parquet(tmp, index=False)
                tmp.rename(self.out / f"part-{uuid.uuid4().hex[:12]}.parquet")
            self.buffer, self.rows = [], 0
        if len(self.skipped) or (self.out / SKIPPED).exists():
            tmp = self.out / f".{SKIPPED}.tmp"
            with _removed_on_failure(tmp):
                self.skipped.to_csv(tmp, index=False)
                tmp.replace(self.out / SKIPPED)


def read_skipped(out: str | Path) -> pd.DataFrame:
    """The images a batch prediction could not read: ``path``, ``sha256``, ``reason``."""
    p = Path(out) / SKIPPED
    return pd.read_csv(p, dtype=str).fillna("") if p.is_file() else pd.DataFrame({"path": [], "reason": []})


def predict_local(
    bundle_dir: str | Path,
    items: pd.DataFrame,
    out: str | Path,
    *,
    batch_size: int = 64,
    part_rows: int = 256,
    flush_s: float = 10.0,
    progress: bool = True,
    threads: int = 0,
    device: str = "cpu",
    variant: str = "auto",
    say: Callable[[str, bool], None] | None = None,
    require_signature: str | None = None,
) -> int:
    """Predict every row of ``items`` not yet in ``out``; returns how many were predicted now (unreadable images
    are listed in ``out/_skipped.csv``, see :func:`read_skipped`, and not counted). ``variant``: see
    :class:`BundlePredictor` (``auto``: the bundle's selected runtime × precision). ``say``: called once the
    bundle is open with what it will do (:meth:`~roadwork.export.bundle.Bundle.answers_statement`).
    ``require_signature``: a public key (PEM); the bundle must be signed by it."""
    from roadwork._progress import progress_bar

    out = Path(out)
    todo = _todo(items, out)
    parts = _Parts(out, part_rows, flush_s, retried={shown(str(p)) for p in todo["path"]})
    predictor = BundlePredictor(
        str(bundle_dir), threads=threads, device=device, variant=variant, require_signature=require_signature
    )
    if say is not None:
        say(*predictor.bundle.answers_statement())
    with progress_bar(total=len(todo), desc="predicting", unit="img", disable=not progress) as bar:
        for chunk in _chunks(todo, batch_size):
            parts.add(predictor(chunk))
            bar.update(len(chunk))
    parts.flush()
    return len(todo) - parts.new_skipped


def predict_ray(
    bundle_dir: str | Path,
    items: pd.DataFrame,
    out: str | Path,
    *,
    batch_size: int = 64,
    actors: int = 2,
    threads_per_actor: int = 1,
    part_rows: int = 256,
    flush_s: float = 10.0,
    variant: str = "auto",
    require_signature: str | None = None,
) -> int:
    """The same on Ray Data: an actor pool of ``actors`` bundle copies (``ray.init`` is called with defaults
    when Ray is not running yet; connect to a cluster first to use one). The prediction rows (a few hundred
    bytes per image) stream back to this process, which writes the part files: ``Dataset.write_parquet`` needs
    free CPUs for its write tasks, and with every CPU held by an actor (2 actors on 2 CPUs) it never ran."""
    from roadwork._deps import require

    ray = require("ray")
    out = Path(out)
    todo = _todo(items, out)
    if not len(todo):
        return 0
    if require_signature is not None:  # checked here first: a refusal is our error, not an actor's crash
        from roadwork.export.signing import verify_bundle

        verify_bundle(bundle_dir, require_signature)
    if not ray.is_initialized():
        ray.init(num_cpus=max(actors * threads_per_actor, 1), include_dashboard=False, log_to_driver=False)
    preds = ray.data.from_pandas(list(_chunks(todo, batch_size))).map_batches(  # one block per batch
        BundlePredictor,
        fn_constructor_args=(
            str(Path(bundle_dir).resolve()),
            threads_per_actor,
            "cpu",
            variant,
            require_signature,
        ),
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` is deprecated since Ray 2.51
        num_cpus=threads_per_actor,
    )
    parts = _Parts(out, part_rows, flush_s, retried={shown(str(p)) for p in todo["path"]})
    for batch in preds.iter_batches(batch_format="pandas", batch_size=None):
        parts.add(pd.DataFrame({c: batch[c].tolist() for c in batch.columns}))  # Arrow-backed → plain columns
    parts.flush()
    return len(todo) - parts.new_skipped


def identical(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Same rows and values (prediction sets compared as lists)."""
    if list(a["path"]) != list(b["path"]) or set(a.columns) != set(b.columns):
        return False
    for c in a.columns:
        x, y = a[c].tolist(), b[c].tolist()
        if c == "prediction_set":
            x, y = [list(v) for v in x], [list(v) for v in y]
        if x != y:
            return False
    return True
