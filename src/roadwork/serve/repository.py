"""Triton's model-repository API over a folder of bundle versions: list them, load one into the running server
without a restart and without failing a request, unload.

The repository is ``settings.repository``, by default the served bundle's parent folder: ``roadwork recertify``
writes its new version next to the old one (``bundle-<policy_version>``), so a recertified version is listed at
once. A version is a sub-folder with a ``manifest.json``; its name is the folder's (plain names only).

Loading reads the version the way start-up does (one verified read, ``require_signature`` enforced), refuses a
version whose model differs in what requests depend on (classes, preprocessing, the cascade's stage inputs:
those need a rolling restart), warms it off the model thread, then swaps it in between two batches: a batch runs
wholly under one version, and every answer carries the ``policy_version`` it was decided under. Requests keep
being served during the load; one load at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from roadwork.errors import ArtifactError, InputError
from roadwork.export.bundle import Bundle
from roadwork.serve.decode import RequestError
from roadwork.serve.settings import ServeSettings
from roadwork.serve.state import ServerState

__all__ = ["NEWEST", "load_bundle", "load_version", "repository_entries", "repository_of", "unload"]

log = logging.getLogger(__name__)
_MAX_POLICY_BYTES = 16 << 20
NEWEST = object()
"""``load_version``'s version for "the newest": the version folder whose manifest was written last."""


def load_bundle(bundle: Bundle | str | Path, settings: ServeSettings) -> Bundle:
    """The bundle, its signature checked first when ``require_signature`` is set, on ``settings.device`` (start-up
    and every load)."""
    if isinstance(bundle, Bundle):
        if settings.require_signature:  # an already loaded bundle cannot prove what it was loaded from
            raise ArtifactError(
                "require_signature needs the bundle's folder, not a loaded Bundle: pass its path, so that the "
                "signature is checked over the very bytes that are loaded."
            )
        return bundle
    from roadwork.export.onnx import execution_device

    with execution_device(settings.device, fp16=settings.trt_fp16, cache_dir=settings.trt_cache_dir):
        return Bundle.load(
            bundle,
            threads=settings.ort_threads,
            variant=settings.variant,
            require_signature=settings.require_signature,
        )


def repository_of(state: ServerState) -> Path:
    """The folder of bundle versions: ``settings.repository``, else the parent of the bundle the server started
    with (fixed then: a load does not move it)."""
    if state.repository is None:
        repo = state.settings.repository
        state.repository = (Path(repo) if repo else Path(state.model.bundle.path).parent).resolve()
    return state.repository


def _version_of(folder: Path) -> str | None:
    """A version folder's ``policy_version`` from its manifest (None when it has none we can read)."""
    try:
        with (folder / "manifest.json").open("rb") as f:
            manifest = json.loads(f.read(_MAX_POLICY_BYTES))
        return str(manifest["files"]["policy.json"])[:12]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _folders(state: ServerState) -> list[Path]:
    """The version folders: the repository's sub-folders with a manifest, and the served one."""
    served = Path(state.model.bundle.path).resolve()
    try:
        folders = sorted(
            p
            for p in repository_of(state).iterdir()
            if not p.is_symlink() and p.is_dir() and (p / "manifest.json").is_file()
        )
    except OSError:
        folders = []
    if served not in [p.resolve() for p in folders]:
        folders.insert(0, served)
    return folders


def repository_entries(state: ServerState) -> list[dict[str, str]]:
    """Triton's index: every version folder of the repository, ``READY`` for the one served."""
    served = Path(state.model.bundle.path).resolve()
    out = []
    for p in _folders(state):
        here = p.resolve() == served
        ready = here and state.serving
        out.append(
            {
                "name": state.model.name,
                "version": p.name,
                "state": "READY" if ready else "UNAVAILABLE",
                "reason": "" if ready else ("unloaded" if here else "not loaded"),
                "policy_version": state.model.bundle.policy_version if here else (_version_of(p) or ""),
            }
        )
    return out


def _folder(state: ServerState, version: object) -> Path:
    """The version's folder inside the repository; 400 for a name that is not a plain folder name, 404 when the
    repository has no such version."""
    if version is NEWEST:
        return max(_folders(state), key=lambda p: (p / "manifest.json").stat().st_mtime)
    names = [e["version"] for e in repository_entries(state)]
    if not isinstance(version, str) or not version or Path(version).name != version or version in (".", ".."):
        raise RequestError(
            400,
            f"parameters.version={str(version)[:80]!r} is not a version folder's name; use one of {names[:20]} "
            "(POST /v2/repository/index lists them).",
        )
    served = Path(state.model.bundle.path).resolve()
    folder = served if version == served.name else repository_of(state) / version
    if folder.is_symlink() or (folder.resolve().parent != repository_of(state) and folder != served):
        raise RequestError(
            400,
            f"version {version!r} is a link: a version must be a folder inside the repository "
            f"({str(repository_of(state))!r}); copy it there.",
        )
    if not (folder / "manifest.json").is_file():
        raise RequestError(404, f"no version {version!r} in the repository; use one of {names[:20]}.")
    return folder


def _compatible(old: Bundle, new: Bundle) -> None:
    """400 unless requests mean the same to ``new`` as to ``old`` (a different model needs a rolling restart)."""
    checks = {
        "classes": (old.classes, new.classes),
        "preprocessing": (old.card.preprocess.to_dict(), new.card.preprocess.to_dict()),
        "cascade stages": (_stage_inputs(old), _stage_inputs(new)),
        "decode side": (old.decode_side, new.decode_side),
    }
    for what, (a, b) in checks.items():
        if a != b:
            raise RequestError(
                400,
                f"this version's {what} differ from the served bundle's ({str(b)[:120]} vs {str(a)[:120]}): "
                "requests would change meaning mid-flight; start a server on it (a rolling restart) instead.",
            )


def _stage_inputs(bundle: Bundle) -> list[tuple[str, Any]] | None:
    """What each cascade stage runs on (None: no cascade): the inputs a request prepared for the served
    version must fit the one loaded meanwhile."""
    if bundle.stage_runners is None:
        return None
    return [(r.kind, r.spec.to_dict() if r.spec is not None else None) for r in bundle.stage_runners]


async def load_version(state: ServerState, version: object) -> dict[str, str]:
    """Load ``version`` and serve it from the next batch on; returns the new index entry."""
    folder = _folder(state, version)
    async with state.load_lock:
        loop = asyncio.get_running_loop()
        try:
            bundle = await loop.run_in_executor(None, load_bundle, folder, state.settings)
        except (ArtifactError, InputError) as e:
            raise RequestError(400, f"version {folder.name!r} was not loaded: {e}") from None
        _compatible(state.model.bundle, bundle)
        await loop.run_in_executor(None, _warm, state, bundle)
        old = state.model.bundle.policy_version
        state.swap(bundle)
        log.info("loaded version %s (policy_version %s, was %s)", folder.name, bundle.policy_version, old)
    entries = [e for e in repository_entries(state) if e["version"] == folder.name]
    return entries[0] if entries else {"name": state.model.name, "version": folder.name, "state": "READY"}


def _warm(state: ServerState, bundle: Bundle) -> None:
    """First calls of the new sessions (allocations) off the model thread, before any request reaches them."""
    import numpy as np

    from roadwork.export.onnx import onnx_logits

    size = bundle.card.preprocess.size
    for n in (1, state.settings.max_batch_size):
        onnx_logits(bundle.session, np.zeros((n, 3, size, size), np.float32), batch_size=n)


def unload(state: ServerState) -> None:
    """Triton's unload: the model stops serving (readiness 503, inference 503) until a version is loaded."""
    state.unloaded = True
