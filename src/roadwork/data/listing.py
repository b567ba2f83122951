"""Which images a user means: image files, folders of them (recursively) and ``.csv``/``.parquet`` manifests, as
one table of paths and metadata. Used by batch prediction, ``roadwork predict`` and the ExPLoRA stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from roadwork.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "list_images", "name_problem", "read_manifest_csv", "shown"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
"""File suffixes taken as images when a folder is listed."""


def shown(path: str) -> str:
    """A path as text that can always be printed and stored (a non-UTF-8 byte as ``\\xff``)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(path: object) -> str | None:
    """Why ``path`` (a manifest cell or a listed file name) cannot be used as an image path, or ``None``."""
    if not isinstance(path, str) or not path.strip() or path.lower() == "nan":
        return "empty path: give every row a path"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8 (written by another system's encoding): rename the file"
    return None


def _usable(paths: list[str], skipped: list[dict[str, str]], where: str) -> list[bool]:
    keep = []
    for i, q in enumerate(paths):
        reason = name_problem(q)
        if reason is not None:
            named = isinstance(q, str) and q.strip()
            row = (
                f"{where} row {i + 2}".strip()
            )  # a manifest's row number as a spreadsheet shows it (header: 1)
            skipped.append({"path": shown(q) if named else row, "reason": reason})
        keep.append(reason is None)
    return keep


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """A CSV manifest as Python strings, whatever its encoding: bytes that are not UTF-8 stay readable (as
    surrogates) in ``path``, where :func:`name_problem` names them, and are shown escaped in other columns."""
    df = pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors="surrogateescape")
    for col in df.columns:
        if col != "path":
            df[col] = [shown(v) if isinstance(v, str) else v for v in df[col]]
    return df


def list_images(sources: Sequence[str | Path]) -> pd.DataFrame:
    """Image files, folders of them (recursively), or manifests (``.csv``/``.parquet`` with a ``path`` column and
    any metadata columns, e.g. ``weather``) → one row per image: ``path`` plus metadata. A manifest's ``label``
    column becomes ``true_label`` (``label`` is the prediction's); its ``split`` column is dropped.

    Entries that cannot be an image path (an empty manifest cell, a file name that is not UTF-8) are left out and
    listed in ``table.attrs["skipped"]`` (``path`` as printable text, ``reason``): one odd name never ends a job."""
    frames: list[pd.DataFrame] = []
    skipped: list[dict[str, str]] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            frames.append(
                pd.DataFrame(
                    {"path": [f for f, ok in zip(files, _usable(files, skipped, ""), strict=True) if ok]}
                )
            )
        elif p.suffix.lower() in (".csv", ".parquet"):
            df = (
                # a cell in another encoding stays readable (and is then named as not UTF-8, not a traceback)
                read_manifest_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
            )
            if "path" not in df.columns:
                raise InputError(f"manifest {str(p)!r} has no 'path' column; it needs one path per image.")
            # the manifest's label is kept beside the prediction's (as true_label), e.g. for accuracy per part
            df = df.drop(columns=[c for c in ("split",) if c in df.columns]).rename(
                columns={"label": "true_label"}
            )
            df = df.loc[np.array(_usable(df["path"].tolist(), skipped, f"manifest {p.name}"), dtype=bool)]
            df["path"] = [q if Path(q).is_absolute() else str(p.parent / q) for q in df["path"]]
            frames.append(df.astype({c: str for c in df.columns}))
        elif p.is_file():
            frames.append(pd.DataFrame({"path": [str(p)] if _usable([str(p)], skipped, "")[0] else []}))
        else:
            raise InputError(
                f"{shown(str(src))!r} is neither an image, a folder of images nor a .csv/.parquet manifest."
            )
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"path": []})
    out = out.drop_duplicates("path", keep="first").reset_index(drop=True)
    out.attrs["skipped"] = skipped
    return out
