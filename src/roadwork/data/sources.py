"""Load a labelled image source into the dataset table, skipping and reporting bad files.

The dataset table (``dataset.parquet``) has one row per usable image:

    id        str   stable identifier (path relative to the source root)
    path      str   absolute path of the image file
    label     str   class name
    split     str   train / val / calib / test (see :mod:`roadwork.data.splits`)
    sha256    str   content hash
    <slices>  str   any further columns (weather, time, camera, ...) used for per-slice results

Sources: an image folder (one subfolder per class), a CSV or Parquet manifest (``path,label`` plus
any slice columns, relative paths resolved against the manifest's folder), or the synthetic generator.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from roadwork.config import DataConfig
from roadwork.data.files import UnreadableFile, read_regular
from roadwork.data.listing import name_problem, read_manifest, shown
from roadwork.data.preprocess import decode_opened, shape_problem
from roadwork.data.splits import assign_splits
from roadwork.errors import DataError, InputError

__all__ = ["CORE_COLUMNS", "DataReport", "build_dataset", "check_image", "check_images"]

CORE_COLUMNS = ("id", "path", "label", "split", "sha256")
"""The columns every ``dataset.parquet`` has; any others are slice columns."""


@dataclass
class DataReport:
    """What happened to every file of the source."""

    n_found: int = 0
    n_used: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_found": self.n_found,
            "n_used": self.n_used,
            "n_skipped": len(self.skipped),
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "class_counts": self.class_counts,
            "split_counts": self.split_counts,
        }


def check_image(path: Path, *, max_pixels: int, max_bytes: int) -> tuple[str | None, str]:
    """Return ``(sha256, "")`` for a usable image, or ``(None, reason)``.

    Only a regular file is read (:mod:`roadwork.data.files`: a FIFO or a link to ``/dev/zero`` is a reason, not a
    hang), at most ``max_bytes`` of it. Decodes the whole file (``Image.verify`` misses truncated JPEGs, a
    ``load`` does not) from the bytes it hashes, through the shared decode (so an image the decode refuses, e.g. a
    float TIFF outside [0, 1], is refused here); a JPEG at its smallest DCT scale (1/8): every byte of
    entropy-coded data is still decoded, so a truncated or corrupt file fails the same way, in about half the time
    of a full decode at 1080p.
    """
    try:
        data = read_regular(path, max_bytes=max_bytes)
    except UnreadableFile as e:
        return None, str(e)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return None, f"too many pixels ({w}x{h} > {max_pixels}; possible decompression bomb)"
                problem = shape_problem(w, h)
                if problem is not None:
                    return None, problem
                decode_opened(im, 1)  # a JPEG at 1/8 (draft), as before; 16-bit and float modes checked
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"decompression bomb: {e}"
    except Exception as e:  # PIL raises many types for bad files; all of them mean "skip"
        kind = (
            "not an image"
            if "cannot identify image file" in str(e)
            else f"corrupt image ({type(e).__name__}: {e})"
        )
        return None, kind
    return hashlib.sha256(data).hexdigest(), ""


def _stored_problem(path: str) -> str | None:
    """Why the data stage cannot keep ``path`` in ``dataset.parquet`` (Parquet strings are UTF-8), or ``None``.
    (``roadwork predict`` reads such a file as is; the dataset table stores paths as text.)"""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return (
            "its name is not valid UTF-8 (written by another system's encoding), and the dataset table stores "
            "paths as UTF-8 text: rename the file"
        )
    return None


def _from_folder(root: Path) -> pd.DataFrame:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"data.source={str(root)!r} is a folder with {len(class_dirs)} class subfolder(s); an image folder "
            "needs one subfolder per class (at least two), e.g. roadwork/ and no_roadwork/."
        )
    rows, skipped = [], []
    for d in class_dirs:
        for f in sorted(d.rglob("*")):
            if f.is_dir() or f.name.startswith("."):  # a FIFO or a device is listed: check_image says why
                continue
            rid = f.relative_to(root).as_posix()
            reason = _stored_problem(str(f))
            if reason is not None:  # one odd name is reported, not the end of the job
                skipped.append({"id": shown(rid), "path": shown(str(f)), "reason": reason})
                continue
            rows.append({"id": rid, "path": str(f.resolve()), "label": d.name})
    df = pd.DataFrame(rows, columns=["id", "path", "label"])
    df.attrs["skipped"] = skipped
    return df


def _from_manifest(path: Path) -> pd.DataFrame:
    try:
        df = read_manifest(path)  # not a regular file, or not valid CSV/Parquet: our error, never a hang
    except InputError as e:
        raise DataError(f"data.source={shown(str(path))!r}: {e}") from None
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise DataError(
            f"Manifest {str(path)!r} lacks the column(s) {sorted(missing)}; it needs 'path' and 'label' "
            f"(plus any slice columns). Found: {list(df.columns)}."
        )
    reserved = {"id", "split", "sha256"} & set(df.columns)
    if reserved:
        raise DataError(
            f"Manifest {str(path)!r} uses reserved column name(s) {sorted(reserved)}; rename them."
        )
    base = path.parent
    skipped = []
    keep = []
    for i, (p, label) in enumerate(zip(df["path"].tolist(), df["label"].tolist(), strict=True)):
        reason = (
            name_problem(p)
            or _stored_problem(p)
            or ("empty label: give every row a label" if not str(label).strip() else None)
        )
        if reason is not None:
            skipped.append(
                {"id": f"row {i + 2}", "path": shown(p) if isinstance(p, str) else "", "reason": reason}
            )
        keep.append(reason is None)
    df = df.loc[np.array(keep, dtype=bool)].astype({"path": str, "label": str})
    df.insert(0, "id", df["path"])
    df["path"] = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in df["path"]]
    for col in df.columns:
        if col not in ("id", "path", "label"):
            df[col] = df[col].astype(str)
    df.attrs["skipped"] = skipped  # manifest rows that name no usable path (row numbers count the header)
    return df


_CHECK_CHUNK = 64  # files per task of a checking process


def _check_many(paths: list[str], max_pixels: int, max_bytes: int) -> list[tuple[str | None, str]]:
    """Worker: :func:`check_image` on each of ``paths``."""
    return [check_image(Path(p), max_pixels=max_pixels, max_bytes=max_bytes) for p in paths]


def check_images(paths: list[str], cfg: DataConfig, progress: bool = True) -> list[tuple[str | None, str]]:
    """:func:`check_image` on each of ``paths`` with ``cfg``'s limits (``max_pixels``, ``max_file_mb``), in
    ``cfg.workers`` processes, with a progress bar: ``(sha256, "")`` or ``(None, reason)`` per path, in order."""
    from roadwork._parallel import process_pool, resolve_workers
    from roadwork._progress import progress_bar

    limits = (cfg.max_pixels, int(cfg.max_file_mb * 2**20))
    chunks = [paths[i : i + _CHECK_CHUNK] for i in range(0, len(paths), _CHECK_CHUNK)]
    workers = min(resolve_workers(cfg.workers), len(chunks))
    bar = progress_bar(
        total=len(paths), desc="checking images", unit="img", leave=False, disable=not progress
    )
    results: list[tuple[str | None, str]] = []
    with bar:
        if workers <= 1:
            for part in chunks:
                results += _check_many(part, *limits)
                bar.update(len(part))
        else:
            with process_pool(workers) as pool:
                futures = [pool.submit(_check_many, part, *limits) for part in chunks]
                for part, fut in zip(chunks, futures, strict=True):
                    results += fut.result()
                    bar.update(len(part))
    return results


def _validate_files(df: pd.DataFrame, cfg: DataConfig, report: DataReport) -> pd.DataFrame:
    """Check (decode and hash) every file (:func:`check_images`); drop and report the unusable ones."""
    paths = [str(p) for p in df["path"]]
    results = check_images(paths, cfg)
    hashes: list[str | None] = []
    for rid, p, (digest, reason) in zip(df["id"], paths, results, strict=True):
        if digest is None:
            report.skipped.append({"id": rid, "path": p, "reason": reason})
        hashes.append(digest)
    df = df.assign(sha256=pd.Series(hashes, index=df.index, dtype=object))
    return df[df["sha256"].notna()].reset_index(drop=True)


def build_dataset(
    cfg: DataConfig, *, synthetic_rows: list[dict[str, Any]] | None = None, synthetic_root: Path | None = None
) -> tuple[pd.DataFrame, list[str], DataReport]:
    """Build the dataset table for ``cfg.source``; returns ``(table, class_names, report)``.

    For ``source='synthetic'`` the caller generates the images and passes their rows (already hashed).
    """
    report = DataReport()
    if cfg.source == "synthetic":
        if synthetic_rows is None or synthetic_root is None:
            raise DataError(
                "source='synthetic' needs the generated rows; use roadwork.pipeline to run the data stage."
            )
        from roadwork.data.synthetic import CLASSES

        df = pd.DataFrame(synthetic_rows)
        df["id"] = df["path"]
        df["path"] = [str((synthetic_root / p).resolve()) for p in df["path"]]
        df["label"] = [CLASSES[i] for i in df["label"]]
        df = df.drop(columns=["index", "true_label"]).astype({"label_flipped": str})
        report.n_found = len(df)
    else:
        src = Path(cfg.source)
        if not src.exists():
            raise DataError(
                f"data.source={cfg.source!r} does not exist. Pass 'synthetic', an image folder with one subfolder "
                "per class, or a .csv/.parquet manifest with 'path' and 'label' columns."
            )
        if src.is_dir():
            df = _from_folder(src)
        elif src.suffix in (".csv", ".parquet"):
            df = _from_manifest(src)
        else:
            raise DataError(f"data.source={cfg.source!r} is a file but not a .csv or .parquet manifest.")
        report.skipped.extend(df.attrs.get("skipped", []))
        report.n_found = len(df) + len(report.skipped)
        df = _validate_files(df, cfg, report)  # suffixes are not trusted: every file is decoded
        # one canonical row order, by content: a folder and a manifest listing the same files (or a manifest in
        # another row order) give the same table order, so the same training order and the same model
        df = df.sort_values(["sha256", "id"], kind="stable").reset_index(drop=True)
    classes = sorted(df["label"].unique().tolist())
    counts = df["label"].value_counts().to_dict()
    report.class_counts = {c: int(counts.get(c, 0)) for c in classes}
    too_few = {c: n for c, n in report.class_counts.items() if n < cfg.min_per_class}
    if len(classes) < 2 or too_few:
        detail = ", ".join(f"'{c}' has {n}" for c, n in too_few.items()) or f"found classes {classes}"
        raise DataError(
            f"Not enough usable images per class in {cfg.source!r}: {detail}; each class needs at least "
            f"data.min_per_class={cfg.min_per_class} (and there must be two classes). Add images or lower "
            f"data.min_per_class. {len(report.skipped)} file(s) were skipped as unusable."
        )
    dup = df[df.duplicated("sha256", keep=False)]
    report.duplicates = [sorted(g["id"].tolist()) for _, g in dup.groupby("sha256")]
    df["split"] = assign_splits(df["sha256"].tolist(), cfg.splits)
    report.n_used = len(df)
    report.split_counts = {
        str(s): {str(c): int(n) for c, n in g["label"].value_counts().sort_index().items()}
        for s, g in df.groupby("split")
    }
    slices = [c for c in df.columns if c not in CORE_COLUMNS]
    return df[list(CORE_COLUMNS) + slices], classes, report
