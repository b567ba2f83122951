"""The MLflow pyfunc that runs a roadwork bundle — logged as *code* (MLflow's models-from-code), so loading
it unpickles nothing. ``mlflow.pyfunc.load_model(uri).predict(df)`` takes a DataFrame with an ``image``
column (base64 text or raw bytes of JPEG/PNG/WebP files) and optional slice columns (e.g. ``weather``), and
returns one row per image: label, probability, prediction set, abstain, stage[, score]."""

from __future__ import annotations

import base64
from typing import Any

import mlflow
import pandas as pd


class BundleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from roadwork.export.bundle import Bundle

        self.bundle = Bundle.load(context.artifacts["bundle"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from roadwork.data.preprocess import load_rgb

        blobs = [b if isinstance(b, bytes) else base64.b64decode(b) for b in model_input["image"]]
        cols = [c for c in self.bundle.policy.slice_columns if c in model_input.columns]
        slices = {c: model_input[c].astype(str).tolist() for c in cols} or None
        out = self.bundle.predict_images([load_rgb(b, self.bundle.decode_side) for b in blobs], slices)
        recs = out.records(self.bundle.classes)
        for r in recs:
            r["prediction_set"] = ",".join(
                r["prediction_set"]
            )  # a flat column: MLflow signatures have no lists
        return pd.DataFrame(recs)


mlflow.models.set_model(BundleModel())
