"""roadwork: labelled images in; a calibrated, conformal, certified, deployable classifier out.

Importing roadwork imports neither torch nor any web framework; they load inside the functions that
need them.
"""

from __future__ import annotations

from importlib import metadata

from roadwork.config import RunConfig, load_config
from roadwork.errors import RoadworkError
from roadwork.export.bundle import Bundle
from roadwork.pipeline import RunResult, run_pipeline
from roadwork.trust import Predictions, TrustPolicy

try:
    __version__ = metadata.version("roadwork")
except metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "Bundle",
    "Predictions",
    "RoadworkError",
    "RunConfig",
    "RunResult",
    "TrustPolicy",
    "__version__",
    "load_config",
    "run_pipeline",
]
