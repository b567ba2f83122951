"""Which images a user means: image files, folders of them (recursively) and ``.csv``/``.parquet`` manifests, as
one table of paths and metadata. Used by batch prediction, ``roadwork predict`` and the ExPLoRA stage.

Paths are kept as the operating system gives them (``os.fsdecode``: a byte of a file name that is not UTF-8 is a
surrogate character), so every file can be opened, whatever system wrote its name. Anything written out (a
prediction's ``path``, a skipped-file list, a message) goes through :func:`shown`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from roadwork.data.files import UnreadableFile, open_regular
from roadwork.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "list_images", "name_problem", "read_manifest", "shown"]

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
"""File suffixes taken as images when a folder is listed: the formats the one decode path reads
(:func:`roadwork.data.preprocess.load_rgb`; a file named explicitly is read whatever its suffix)."""


def shown(path: str) -> str:
    """A path as text that can always be printed and stored (CSV, JSON, Parquet): unchanged when its name is
    valid UTF-8, else each byte that is not UTF-8 written as ``\\xNN`` (Python's ``errors="backslashreplace"``), e.g.
    ``stra\\xdfe.jpg`` for a Latin-1 ``straße.jpg``. Back to the name's bytes: replace each ``\\xNN`` by its byte."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(path: object) -> str | None:
    """Why ``path`` (a manifest cell) names no file at all (an empty cell), or ``None``."""
    if not isinstance(path, str) or not path.strip() or path.lower() == "nan":
        return "empty path: give every row a path"
    return None


def _usable(paths: list[str], skipped: list[dict[str, str]], where: str) -> list[bool]:
    keep = []
    for i, q in enumerate(paths):
        reason = name_problem(q)
        if reason is not None:  # a manifest's row number as a spreadsheet shows it (header: 1)
            skipped.append({"path": f"{where} row {i + 2}", "reason": reason})
        keep.append(reason is None)
    return keep


def _paths(paths: list[str]) -> pd.DataFrame:
    """A table of paths, kept as Python objects: pandas' Arrow strings cannot hold a name that is not UTF-8."""
    return pd.DataFrame({"path": pd.Series(paths, dtype=object)})


def read_manifest(path: Path) -> pd.DataFrame:
    """A ``.csv`` or ``.parquet`` manifest as a table of Python strings, or :class:`InputError` naming the file,
    what is wrong and the fix (not a regular file, not valid CSV/Parquet). CSV bytes that are not UTF-8 stay
    exact in ``path`` (surrogates: the file they name is opened as is) and are :func:`shown` in other columns."""
    what = f"manifest {shown(str(path))!r}"
    parquet = path.suffix.lower() == ".parquet"
    try:
        with open_regular(path) as f:  # a FIFO or /dev/zero named m.csv is refused, never waited on or read
            if parquet:
                df = pd.read_parquet(f)
            else:
                df = pd.read_csv(
                    f,
                    dtype=object,
                    keep_default_na=False,
                    encoding="utf-8",
                    encoding_errors="surrogateescape",
                )
    except UnreadableFile as e:
        raise InputError(
            f"{what} cannot be used ({e}): pass a regular .csv or .parquet file with a 'path' column."
        ) from None
    except (ValueError, OSError) as e:  # pandas' ParserError and EmptyDataError, Arrow's errors
        fix = (
            "write it again with pandas.DataFrame.to_parquet"
            if parquet
            else "fix that row (an unterminated quote, more cells than the header) or write the file with a CSV writer"
        )
        detail = " ".join(str(e).split()) or type(e).__name__
        raise InputError(
            f"{what} is not a valid {'Parquet' if parquet else 'CSV'} file ({detail}): {fix}."
        ) from None
    for col in df.columns:
        if col != "path":
            df[col] = [shown(v) if isinstance(v, str) else v for v in df[col]]
    return df


def _manifest_rows(p: Path, skipped: list[dict[str, str]]) -> pd.DataFrame:
    df = read_manifest(p)
    if "path" not in df.columns:
        raise InputError(f"manifest {shown(str(p))!r} has no 'path' column; it needs one path per image.")
    # the manifest's label is kept beside the prediction's (as true_label), e.g. for accuracy per part
    df = df.drop(columns=[c for c in ("split",) if c in df.columns]).rename(columns={"label": "true_label"})
    df = df.loc[np.array(_usable(df["path"].tolist(), skipped, f"manifest {shown(p.name)}"), dtype=bool)]
    paths = [q if Path(q).is_absolute() else str(p.parent / q) for q in df["path"]]
    df = df.astype({c: str for c in df.columns if c != "path"})
    df["path"] = pd.Series(paths, index=df.index, dtype=object)
    return df


def list_images(sources: Sequence[str | Path]) -> pd.DataFrame:
    """Image files, folders of them (recursively: files with an :data:`IMAGE_SUFFIXES` suffix), or manifests
    (``.csv``/``.parquet`` with a ``path`` column and any metadata columns, e.g. ``weather``) → one row per image:
    ``path`` plus metadata. A manifest's ``label`` column becomes ``true_label`` (``label`` is the prediction's);
    its ``split`` column is dropped.

    A file named explicitly is a row whether it exists or not: the reader lists it with its reason if it cannot
    be read, as a manifest row naming a missing file. Empty manifest cells are left out and listed in
    ``table.attrs["skipped"]`` (``path``: where, ``reason``): one odd entry never ends a job. A manifest that is not
    a regular file, or not valid CSV/Parquet, is an :class:`InputError` (see :func:`read_manifest`)."""
    frames: list[pd.DataFrame] = []
    skipped: list[dict[str, str]] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()]
            frames.append(_paths(sorted(str(f) for f in files)))
        elif p.suffix.lower() in (".csv", ".parquet"):
            frames.append(_manifest_rows(p, skipped))
        else:  # an image, or a missing path: read (or listed as unreadable) with the others
            frames.append(_paths([str(p)]))
    out = pd.concat(frames, ignore_index=True) if frames else _paths([])
    out = out.drop_duplicates("path", keep="first").reset_index(drop=True)
    out.attrs["skipped"] = skipped
    return out
