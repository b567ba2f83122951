"""``Predictions``: the one currency after the model. ids, integer labels, logits and slice columns.

On disk it is Parquet (written with pyarrow): ``id``, ``label``, ``logits`` (a list of K floats per
row) and one string column per slice; the class names and schema version sit in the file metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from roadwork.errors import ArtifactError, InputError
from roadwork.trust._checks import check_labels, check_logits

__all__ = ["PREDICTIONS_SCHEMA", "Predictions"]

PREDICTIONS_SCHEMA = 1
"""Version of the ``predictions-*.parquet`` layout."""


@dataclass
class Predictions:
    """The one currency after the model: ``n`` rows of id, true label index and logits over ``classes``, plus
    slice columns (weather, camera, ...). Checked on construction (shapes, finite logits, labels in range)."""

    ids: np.ndarray  # (n,) str
    labels: np.ndarray  # (n,) int class indices
    logits: np.ndarray  # (n, K) float
    classes: list[str]
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) str

    def __post_init__(self) -> None:
        self.logits = check_logits(self.logits, "Predictions")
        n, k = self.logits.shape
        if len(self.classes) != k:
            raise InputError(f"Predictions: {len(self.classes)} class names for logits with {k} columns.")
        self.ids = np.asarray(self.ids).astype(str)
        self.labels = check_labels(self.labels, n, k, "Predictions")
        if self.ids.shape != (n,):
            raise InputError(f"Predictions: {self.ids.shape[0]} ids for {n} rows of logits.")
        self.slices = {name: np.asarray(v).astype(str) for name, v in self.slices.items()}
        for name, v in self.slices.items():
            if v.shape != (n,):
                raise InputError(f"Predictions: slice column {name!r} has {v.shape[0]} values for {n} rows.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, mask: np.ndarray) -> Predictions:
        return Predictions(
            self.ids[mask],
            self.labels[mask],
            self.logits[mask],
            list(self.classes),
            {k: v[mask] for k, v in self.slices.items()},
        )

    def to_parquet(self, path: str | Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {
            "id": pa.array(self.ids.tolist(), pa.string()),
            "label": pa.array(self.labels, pa.int64()),
            "logits": pa.FixedSizeListArray.from_arrays(
                pa.array(self.logits.ravel(), pa.float64()), self.n_classes
            ),
        }
        for name, v in self.slices.items():
            cols[f"slice.{name}"] = pa.array(v.tolist(), pa.string())
        meta = {b"roadwork": json.dumps({"schema": PREDICTIONS_SCHEMA, "classes": self.classes}).encode()}
        table = pa.table(cols).replace_schema_metadata(meta)
        pq.write_table(table, path)

    @classmethod
    def from_parquet(cls, path: str | Path) -> Predictions:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[b"roadwork"])
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{str(path)!r} is not a roadwork predictions file: {e}") from None
        if meta.get("schema") != PREDICTIONS_SCHEMA:
            raise ArtifactError(
                f"{str(path)!r} has predictions schema {meta.get('schema')}; "
                f"this roadwork reads schema {PREDICTIONS_SCHEMA}."
            )
        k = len(meta["classes"])
        logits = table.column("logits").combine_chunks().flatten().to_numpy().reshape(-1, k)
        slices = {
            n[len("slice.") :]: np.asarray(table.column(n).to_pylist(), dtype=str)
            for n in table.column_names
            if n.startswith("slice.")
        }
        return cls(
            np.asarray(table.column("id").to_pylist(), dtype=str),
            table.column("label").to_numpy(),
            logits,
            list(meta["classes"]),
            slices,
        )
