"""Strict JSON: how every roadwork artefact (policy, metrics, manifests, reports' data) is written.

RFC 8259 has no NaN or Infinity; Python's ``json`` writes them by default and ``JSON.parse`` (or any other
language's parser) then fails on our files. Here every non-finite float becomes ``null`` and the writer
refuses anything else that is not JSON (``allow_nan=False``). Where a ``null`` has a meaning (an unbounded
threshold), the object that owns the field says so in an explicit field beside it (e.g. the abstention
certificate's ``"answers": "none"``) and reads ``null`` back as ``+inf`` with :func:`threshold_from_json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from roadwork.errors import ArtifactError

__all__ = ["dumps", "jsonable", "parse_artifact", "threshold_from_json", "threshold_to_json", "write_json"]

_T = TypeVar("_T")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays as Python values, tuples as lists, paths as strings, and every
    non-finite float (NaN, ±inf) as ``None``."""
    if isinstance(obj, bool | None | str | int) and not isinstance(obj, np.integer):
        return obj
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r}")


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON to ``path``."""
    Path(path).write_text(dumps(obj, indent=indent))


def parse_artifact(
    data: str | bytes, build: Callable[[dict[str, Any]], _T], *, where: str, what: str, fix: str
) -> _T:
    """``build`` of the JSON object ``data``: how every JSON artefact roadwork reads back is parsed. Anything
    malformed — not JSON, nested too deeply, not an object, a field missing or of the wrong type or value (whatever
    ``build`` raises: ``KeyError``, ``TypeError``, ``AttributeError``, ``ValueError``, ``IndexError``,
    ``OverflowError``, ``RecursionError``, or our :class:`ArtifactError`) — is an :class:`ArtifactError` naming
    ``where`` (the file), what is wrong with it and ``fix``, never a traceback."""

    def refuse(wrong: str) -> ArtifactError:
        return ArtifactError(f"{where!r} is not a valid {what}: {wrong[:300]}. {fix}")

    try:
        obj = json.loads(data)
    except RecursionError:
        raise refuse("it is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise refuse(f"it is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise refuse(f"it holds {_JSON_KINDS.get(type(obj), 'null')}, not a JSON object")
    try:
        return build(obj)
    except ArtifactError as e:
        raise refuse(str(e).rstrip(".")) from None
    except KeyError as e:
        raise refuse(f"it has no {str(e.args[0] if e.args else e)[:80]!r} field") from None
    except RecursionError:
        raise refuse("it is nested too deeply") from None
    except (TypeError, AttributeError, ValueError, IndexError, OverflowError) as e:
        raise refuse(f"a field has the wrong type or value ({type(e).__name__}: {e})") from None


def threshold_to_json(value: float) -> float | None:
    """A threshold for JSON: ``None`` for +inf (unbounded), the float otherwise."""
    return None if math.isinf(value) and value > 0 else float(value)


def threshold_from_json(value: Any) -> float:
    """The inverse of :func:`threshold_to_json`; also reads the ``Infinity`` that older files hold."""
    return math.inf if value is None else float(value)
