"""Batch prediction: a bundle over a folder or manifest of images, into a Parquet dataset (a folder of part
files), locally or on a Ray cluster. Both engines run the whole ``TrustPolicy`` (and cascade) through
:meth:`Bundle.predict_images` on images decoded the same way, so their outputs are identical.

- ``local``: streams the images in chunks of ``batch_size`` and writes one part file per ``part_rows``
  predictions: memory stays bounded by one part, whatever the number of images; a progress bar shows the way.
- ``ray``: Ray Data — ``map_batches`` with an actor pool that loads the bundle once per actor; the small
  prediction rows stream back and are written as part files. On one machine the actors split the cores; on a
  cluster they spread over it.

Both resume: images whose path is already in the output folder are skipped, so an interrupted job continues.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from roadwork.errors import InputError

__all__ = ["BundlePredictor", "identical", "list_images", "predict_local", "predict_ray", "read_predictions"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_images(sources: Sequence[str | Path]) -> pd.DataFrame:
    """Image files, folders of them (recursively), or manifests (``.csv``/``.parquet`` with a ``path`` column and
    any metadata columns, e.g. ``weather``) → one row per image: ``path`` plus metadata. A manifest's ``label``
    column becomes ``true_label`` (``label`` is the prediction's); its ``split`` column is dropped."""
    frames = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            frames.append(pd.DataFrame({"path": files}))
        elif p.suffix.lower() in (".csv", ".parquet"):
            df = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
            if "path" not in df.columns:
                raise InputError(f"manifest {str(p)!r} has no 'path' column; it needs one path per image.")
            # the manifest's label is kept beside the prediction's (as true_label), e.g. for accuracy per part
            df = df.drop(columns=[c for c in ("split",) if c in df.columns]).rename(
                columns={"label": "true_label"}
            )
            df["path"] = [q if Path(q).is_absolute() else str(p.parent / q) for q in df["path"]]
            frames.append(df.astype({c: str for c in df.columns}))
        elif p.is_file():
            frames.append(pd.DataFrame({"path": [str(p)]}))
        else:
            raise InputError(
                f"{str(src)!r} is neither an image, a folder of images nor a .csv/.parquet manifest."
            )
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"path": []})
    return out.drop_duplicates("path", keep="first").reset_index(drop=True)


def read_predictions(out: str | Path) -> pd.DataFrame:
    """Every part file of an output folder, one row per image, sorted by path."""
    parts = sorted(Path(out).glob("*.parquet")) if Path(out).is_dir() else []
    if not parts:
        return pd.DataFrame({"path": []})
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values(
        "path", ignore_index=True
    )


def _todo(items: pd.DataFrame, out: Path) -> pd.DataFrame:
    if out.exists() and not out.is_dir():
        raise InputError(
            f"out={str(out)!r} is a file; batch prediction writes a folder of Parquet parts. Pass a new folder name."
        )
    done = set(read_predictions(out)["path"]) if out.is_dir() else set()
    return items[~items["path"].isin(done)].reset_index(drop=True)


class BundlePredictor:
    """Loads a bundle once and predicts a batch (a DataFrame with ``path`` and metadata columns). Used as is by
    the local engine and as the Ray actor class."""

    def __init__(self, bundle_dir: str, threads: int = 0) -> None:
        from roadwork.export.bundle import Bundle

        self.bundle = Bundle.load(bundle_dir, threads=threads)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from roadwork.export.bundle import _open

        paths = [str(p) for p in batch["path"]]
        meta = {
            c: batch[c].astype(str).tolist() for c in self.bundle.policy.slice_columns if c in batch.columns
        }
        out = self.bundle.predict_images([_open(p) for p in paths], meta or None)
        recs = pd.DataFrame(out.records(self.bundle.classes))
        recs.insert(0, "path", paths)
        for c in batch.columns:
            if c != "path":
                recs[c] = batch[c].astype(str).to_numpy()
        return recs


def _chunks(df: pd.DataFrame, n: int) -> Iterator[pd.DataFrame]:
    for i in range(0, len(df), n):
        yield df.iloc[i : i + n]


class _Parts:
    """Buffers predicted rows and writes them ``part_rows`` at a time as ``part-*.parquet`` (temp name + rename:
    a reader, or a resumed job, never sees half a file)."""

    def __init__(self, out: Path, part_rows: int) -> None:
        self.out, self.part_rows = out, part_rows
        self.buffer: list[pd.DataFrame] = []
        self.rows = 0
        out.mkdir(parents=True, exist_ok=True)

    def add(self, df: pd.DataFrame) -> None:
        self.buffer.append(df)
        self.rows += len(df)
        if self.rows >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            part = pd.concat(self.buffer, ignore_index=True)
            tmp = self.out / f".part-{uuid.uuid4().hex}.tmp"
            part.to_parquet(tmp, index=False)
            tmp.rename(self.out / f"part-{uuid.uuid4().hex[:12]}.parquet")
            self.buffer, self.rows = [], 0


def predict_local(
    bundle_dir: str | Path,
    items: pd.DataFrame,
    out: str | Path,
    *,
    batch_size: int = 64,
    part_rows: int = 4096,
    progress: bool = True,
    threads: int = 0,
) -> int:
    """Predict every row of ``items`` not yet in ``out``; returns how many were predicted now."""
    from tqdm.auto import tqdm

    out = Path(out)
    todo = _todo(items, out)
    parts = _Parts(out, part_rows)
    predictor = BundlePredictor(str(bundle_dir), threads=threads)
    with tqdm(total=len(todo), desc="predicting", unit="img", disable=not progress) as bar:
        for chunk in _chunks(todo, batch_size):
            parts.add(predictor(chunk))
            bar.update(len(chunk))
    parts.flush()
    return len(todo)


def predict_ray(
    bundle_dir: str | Path,
    items: pd.DataFrame,
    out: str | Path,
    *,
    batch_size: int = 64,
    actors: int = 2,
    threads_per_actor: int = 1,
    part_rows: int = 4096,
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
    if not ray.is_initialized():
        ray.init(num_cpus=max(actors * threads_per_actor, 1), include_dashboard=False, log_to_driver=False)
    preds = ray.data.from_pandas(list(_chunks(todo, batch_size))).map_batches(  # one block per batch
        BundlePredictor,
        fn_constructor_args=(str(Path(bundle_dir).resolve()), threads_per_actor),
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` is deprecated since Ray 2.51
        num_cpus=threads_per_actor,
    )
    parts = _Parts(out, part_rows)
    for batch in preds.iter_batches(batch_format="pandas", batch_size=None):
        parts.add(pd.DataFrame({c: batch[c].tolist() for c in batch.columns}))  # Arrow-backed → plain columns
    parts.flush()
    return len(todo)


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
