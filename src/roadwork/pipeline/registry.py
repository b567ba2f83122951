"""The MLflow model registry: log a bundle as a pyfunc model (signature and input example included),
register it under a name, and turn ``models:/NAME/VERSION`` back into a bundle folder to serve.

Any MLflow tracking URI works; roadwork's default is the local SQLite store of the runs folder.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.errors import ArtifactError

__all__ = ["log_bundle", "resolve_bundle"]


def _example() -> Any:
    """A one-image input example: a tiny blank JPEG, base64."""
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="JPEG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def log_bundle(
    bundle_dir: str | Path, *, registered_name: str | None = None, tracking_uri: str | None = None
) -> str:
    """Log ``bundle_dir`` as an MLflow pyfunc model in the active run (or a new one); returns the model URI
    (``models:/NAME/VERSION`` when ``registered_name`` is given)."""
    mlflow = require("mlflow")
    from mlflow.models import infer_signature

    from roadwork.export.bundle import Bundle

    bundle_dir = Path(bundle_dir)
    bundle = Bundle.load(bundle_dir)  # verifies the hashes before anything is logged
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    example = _example()
    from roadwork.pipeline.mlflow_model import BundleModel

    model = BundleModel()
    model.bundle = bundle
    output = model.predict(None, example)
    code = Path(__file__).with_name("mlflow_model.py")
    own_run = mlflow.active_run() is None
    if own_run:
        mlflow.start_run(run_name=f"bundle-{bundle_dir.parent.parent.name}")
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={"bundle": str(bundle_dir)},
            signature=infer_signature(example, output),
            input_example=example,
            registered_model_name=registered_name,
            pip_requirements=["roadwork[serve]", "mlflow", "pandas"],
        )
    finally:
        if own_run:
            mlflow.end_run()
    if registered_name:
        return f"models:/{registered_name}/{info.registered_model_version}"
    return str(info.model_uri)


def resolve_bundle(uri: str, *, tracking_uri: str | None = None) -> Path:
    """``models:/NAME/VERSION`` (or ``runs:/...``) → a local bundle folder (downloaded from the registry)."""
    mlflow = require("mlflow")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/") + "/artifacts/bundle"))
    except Exception as e:  # MlflowException, missing registry entries, connection errors
        raise ArtifactError(
            f"Could not fetch {uri!r} from the MLflow registry at {mlflow.get_tracking_uri()!r} ({e}). Check the "
            "name and version (mlflow ui lists them) and the tracking URI (MLFLOW_TRACKING_URI or tracking_uri=)."
        ) from None
    if not (local / "manifest.json").is_file():
        raise ArtifactError(
            f"{uri!r} holds no roadwork bundle; log one with roadwork.pipeline.registry.log_bundle."
        )
    return local
