"""Import optional heavy dependencies inside the functions that need them, with an actionable error."""

from __future__ import annotations

import importlib
from types import ModuleType

from roadwork.errors import MissingDependencyError

_EXTRA = {
    "torch": "train",
    "timm": "train",
    "lightning_fabric": "train",
    "safetensors": "train",
    "onnx": "train",
    "onnxscript": "train",
    "matplotlib": "train",
    "mlflow": "train",
    "onnxruntime": "serve",
    "cryptography": "serve",
    "sklearn": "tabular",
    "xgboost": "tabular",
    "lightgbm": "tabular",
    "catboost": "tabular",
    "optuna": "sweep",
    "wandb": "wandb",
    "ray": "ray",
}


def require(module: str) -> ModuleType:
    """``importlib.import_module`` that names the extra to install when the module is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingDependencyError(top, _EXTRA.get(top, "train")) from None
