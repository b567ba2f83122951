"""Prediction logging for drift monitoring: what the server answered, in rotating Parquet files.

Rows are buffered in memory and written ``rows_per_file`` at a time (and on shutdown) as
``predictions-<UTC time>-<seq>.parquet``, each through a temporary name and a rename, so a reader never sees
a half-written file. ``roadwork monitor REFERENCE LOG_DIR`` reads the folder.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["PredictionLog"]

_MAX_META_KEYS, _MAX_META_LEN = 16, 64
_RESERVED = {"ts", "label", "probability", "set_size", "abstain", "stage", "score"}


class PredictionLog:
    """Buffered, rotating Parquet files of what ``/v1/classify`` answered (``log_dir``)."""

    def __init__(self, directory: str | Path, rows_per_file: int = 10_000) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._seq = 0

    def add(self, records: list[dict[str, Any]], metadata: list[dict[str, Any]]) -> None:
        """One row per prediction; request metadata (slice fields such as weather) becomes string columns
        (at most 16 keys of at most 64 characters: a client cannot blow the log up)."""
        now = time.time()
        rows = []
        for rec, meta in zip(records, metadata, strict=True):
            row: dict[str, Any] = {
                "ts": now,
                "label": rec["label"],
                "probability": rec["probability"],
                "set_size": len(rec["prediction_set"]),
                "abstain": rec["abstain"],
                "stage": rec.get("stage", "model"),
                "score": rec.get("score"),
            }
            for k, v in list(meta.items())[:_MAX_META_KEYS]:
                if k not in _RESERVED and isinstance(v, str | int | float | bool):
                    row[str(k)[:_MAX_META_LEN]] = str(v)[:_MAX_META_LEN]
            rows.append(row)
        with self._lock:
            self._rows.extend(rows)
            full = len(self._rows) >= self.rows_per_file
        if full:
            self.flush()

    def flush(self) -> Path | None:
        import pandas as pd

        with self._lock:
            rows, self._rows = self._rows, []
            self._seq += 1
            seq = self._seq
        if not rows:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.dir / f"predictions-{stamp}-{seq:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        tmp.rename(path)
        return path
