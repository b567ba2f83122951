"""Which images a user means: image files, folders of them (recursively) and ``.csv``/``.parquet`` manifests, as
one table of paths and metadata. Used by batch prediction, ``roadwork predict`` and the ExPLoRA stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from roadwork.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "list_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
"""File suffixes taken as images when a folder is listed."""


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
