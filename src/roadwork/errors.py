"""Every error roadwork raises on purpose, in one place.

Errors at a public boundary name the argument, the value received and the fix, in one template
(see :func:`bad_value`). The hierarchy::

    RoadworkError                      base of everything below; catch this to catch ours
    ├── ConfigError (ValueError)       a config key or value is wrong (typos get a suggestion)
    ├── DataError (ValueError)         a data source is unusable (missing folder, too few images per class)
    ├── InputError (ValueError)        arrays handed to a public function have the wrong shape/values
    ├── NotFittedError (RuntimeError)  a calibrator/conformal object was used before ``fit``
    ├── ArtifactError (RuntimeError)   a run folder or bundle is missing a file or fails its hash check
    └── MissingDependencyError (ImportError)  an optional extra is not installed; names the pip command

    RoadworkWarning (UserWarning)      something is valid but degraded (e.g. too few calibration points)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "InputError",
    "MissingDependencyError",
    "NotFittedError",
    "RoadworkError",
    "RoadworkWarning",
    "bad_value",
]


class RoadworkError(Exception):
    """Base class of every error roadwork raises on purpose."""


class ConfigError(RoadworkError, ValueError):
    """A configuration key or value is invalid."""


class DataError(RoadworkError, ValueError):
    """A data source cannot be used as given."""


class InputError(RoadworkError, ValueError):
    """An array or argument handed to a public function is invalid."""


class NotFittedError(RoadworkError, RuntimeError):
    """An estimator was used before ``fit``."""

    def __init__(self, obj: object) -> None:
        name = type(obj).__name__
        super().__init__(
            f"This {name} instance is not fitted yet. Call 'fit' with appropriate arguments first."
        )


class ArtifactError(RoadworkError, RuntimeError):
    """An artifact (run folder, bundle, manifest) is missing, corrupt or tampered with."""


class MissingDependencyError(RoadworkError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"This feature needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'roadwork[{extra}]'"
        )


class RoadworkWarning(UserWarning):
    """A valid but degraded situation the user should know about."""


def bad_value(name: str, where: str, expected: str, got: Any) -> InputError:
    """Build the one message template used for invalid arguments.

    >>> str(bad_value("alpha", "conformal.fit", "a float in (0, 1)", 1.5))
    "The 'alpha' parameter of conformal.fit must be a float in (0, 1). Got 1.5 instead."
    """
    return InputError(f"The '{name}' parameter of {where} must be {expected}. Got {got!r} instead.")
