"""roadwork: labelled images in; a calibrated, conformal, certified, deployable classifier out.

Importing roadwork imports neither torch nor any web framework; they load inside the functions that
need them. The public names below load on first use (PEP 562), so ``roadwork help`` and other light
commands start without pandas, pydantic or numba.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from roadwork.config import RunConfig, load_config
    from roadwork.errors import RoadworkError
    from roadwork.export.bundle import Bundle
    from roadwork.pipeline import RunResult, run_pipeline
    from roadwork.trust import Predictions, TrustPolicy

_EXPORTS = {
    "Bundle": "roadwork.export.bundle",
    "Predictions": "roadwork.trust",
    "RoadworkError": "roadwork.errors",
    "RunConfig": "roadwork.config",
    "RunResult": "roadwork.pipeline",
    "TrustPolicy": "roadwork.trust",
    "load_config": "roadwork.config",
    "run_pipeline": "roadwork.pipeline",
}

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


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib import metadata

        try:
            version = metadata.version("roadwork")
        except metadata.PackageNotFoundError:  # running from a source tree without installing
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'roadwork' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
