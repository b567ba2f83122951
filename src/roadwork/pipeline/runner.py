"""Cached, atomic stage runner.

Each stage writes into ``runs/<name>/<stage>/`` through a temp folder that is renamed into place only
when the stage finished, with a ``manifest.json``: schema, cache key, config section, the output digests
of its inputs, sha256 of every output file, library versions and duration. A stage is a cache hit when
its key — hash of (stage, config sections, input digests, code version, source fingerprint) — matches
the manifest on disk and every listed output still has its size. An interrupted run leaves only
``.tmp-*`` folders, removed on the next run, which resumes at the first stage that is not complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from roadwork.config import RunConfig
from roadwork.errors import ConfigError
from roadwork.jsonio import write_json

__all__ = [
    "STAGE_SCHEMA",
    "Stage",
    "StageContext",
    "StageResult",
    "code_files",
    "code_version",
    "config_value",
    "run_folder_lock",
    "run_stages",
]

STAGE_SCHEMA = 1
"""The layout version of a stage's manifest.json (a change invalidates every cached stage)."""


@dataclass
class StageContext:
    """What a stage function gets: the config, the folder to write into, its inputs' folders, the tracker."""

    cfg: RunConfig
    out: Path  # temp folder to write into
    inputs: dict[str, Path]  # final folders of the stages this one depends on
    tracker: Any
    progress: bool = True
    on_epoch: Callable[[int, dict[str, float]], None] | None = None  # training progress (sweeps prune on it)


@dataclass(frozen=True)
class Stage:
    """One node of the stage graph: its inputs, the config keys and source it depends on, its function."""

    name: str
    deps: tuple[str, ...]
    config: tuple[str, ...]  # RunConfig sections (or dotted keys below them) that change the output
    fn: Callable[[StageContext], dict[str, Any]]
    fingerprint: Callable[[RunConfig], str] | None = None  # e.g. the state of a source folder
    code: tuple[str, ...] = ()  # package-relative source paths whose edits invalidate the stage; () = all


@dataclass
class StageResult:
    """One stage of a run: whether it was a cache hit, how long it took, its folder, digest and info."""

    name: str
    cached: bool
    seconds: float  # duration of the run that produced the outputs (the original run for cache hits)
    path: Path
    digest: str
    info: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ROOT = Path(__file__).resolve().parents[1]
_CODE_VERSIONS: dict[tuple[str, ...], str] = {}


def code_files(paths: tuple[str, ...] = ()) -> list[Path]:
    """roadwork's source files under ``paths`` (package-relative files or folders; () = the whole package)."""
    roots = [_ROOT / p for p in paths] or [_ROOT]
    files = {f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py"))}
    return sorted(files)


def code_version(paths: tuple[str, ...] = ()) -> str:
    """Package version plus a hash of the source files a stage runs (see ``Stage.code``): editing the report
    does not retrain the model, editing the training loop does."""
    if paths not in _CODE_VERSIONS:
        h = hashlib.sha256()
        for p in code_files(paths):
            h.update(p.relative_to(_ROOT).as_posix().encode())
            h.update(p.read_bytes())
        try:
            version = metadata.version("roadwork")
        except metadata.PackageNotFoundError:
            version = "0+unknown"
        _CODE_VERSIONS[paths] = f"{version}+{h.hexdigest()[:12]}"
    return _CODE_VERSIONS[paths]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("numpy", "torch", "timm", "onnxruntime", "lightning-fabric"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def config_value(cfg: RunConfig, path: str) -> Any:
    """A config section or a dotted key below one (``cascade.small``), as JSON-ready data."""
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _key(stage: Stage, cfg: RunConfig, input_digests: dict[str, str]) -> str:
    payload = {
        "stage": stage.name,
        "code": code_version(stage.code),
        "inputs": input_digests,
        "config": {s: config_value(cfg, s) for s in stage.config},
        "fingerprint": stage.fingerprint(cfg) if stage.fingerprint else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    for rel, entry in m.get("outputs", {}).items():
        p = d / rel
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return None
    return m


def _descendants(stages: list[Stage], roots: set[str]) -> set[str]:
    out = set(roots)
    for s in stages:  # stages are in topological order
        if any(d in out for d in s.deps):
            out.add(s.name)
    return out


def _stages_to_run(stages: list[Stage], until: str | None) -> list[Stage]:
    """``until`` and every stage it depends on (all stages without ``until``), in graph order."""
    if not until:
        return stages
    keep = {until}
    for s in reversed(stages):
        if s.name in keep:
            keep.update(s.deps)
    return [s for s in stages if s.name in keep]


def _cached(stage: Stage, final: Path, key: str, forced: set[str]) -> StageResult | None:
    """The stage's stored result when its folder's manifest has this key (inputs, config and code unchanged)."""
    manifest = None if stage.name in forced else _read_manifest(final)
    if manifest is None or manifest.get("key") != key or manifest.get("schema") != STAGE_SCHEMA:
        return None
    info = manifest.get("info", {})
    return StageResult(stage.name, True, float(manifest["seconds"]), final, manifest["digest"], info)


def _execute(stage: Stage, ctx: StageContext, key: str, digests: dict[str, str]) -> StageResult:
    """Run the stage into its temporary folder ``ctx.out``, write its manifest (every output's sha256), then
    swap the folder into place: a stage becomes visible only complete."""
    tmp, cfg = ctx.out, ctx.cfg
    t0 = time.perf_counter()
    try:
        info = stage.fn(ctx)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    outputs = {
        p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    digest = hashlib.sha256(
        json.dumps({k: v["sha256"] for k, v in outputs.items()}, sort_keys=True).encode()
    ).hexdigest()
    manifest = {
        "schema": STAGE_SCHEMA,
        "stage": stage.name,
        "key": key,
        "digest": digest,
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(stage.code),
        "inputs": digests,
        "config": {s: config_value(cfg, s) for s in stage.config},
        "versions": _versions(),
        "info": info,
        "outputs": outputs,
    }
    write_json(tmp / "manifest.json", manifest)
    final = cfg.run_dir / stage.name
    old = cfg.run_dir / f".tmp-old-{stage.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # the stage becomes visible only complete
    shutil.rmtree(old, ignore_errors=True)
    return StageResult(stage.name, False, seconds, final, digest, info)


def run_stages(
    stages: list[Stage],
    cfg: RunConfig,
    *,
    force: Iterable[str] = (),
    until: str | None = None,
    tracker: Any = None,
    progress: bool = True,
    on_stage: Callable[[StageResult], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[StageResult]:
    """Run every stage up to ``until`` in graph order, reusing a stage whose key (inputs' digests, config
    keys, code) is unchanged; ``force`` reruns stages and their dependents. Returns one result per stage."""
    names = [s.name for s in stages]
    force = set(force)
    unknown = force - set(names) | ({until} - set(names) if until else set())
    if unknown:
        raise ConfigError(f"Unknown stage(s) {sorted(unknown)}; the stages are: {', '.join(names)}.")
    stages = _stages_to_run(stages, until)
    forced = _descendants(stages, force)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(run_dir):
        return _run_locked(stages, cfg, forced, tracker, progress, on_stage, on_epoch)


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an exclusive ``flock``, released by the kernel if the process dies) for a run;
    a second run on the same folder gets our error at once instead of deleting the first one's stage folders."""
    import fcntl

    lock = (run_dir / ".lock").open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"run folder {run_dir} is in use by another roadwork run ({holder}); wait for it to finish, or "
                f"pass another name=... for a separate run folder."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        lock.flush()
        yield
    finally:
        lock.close()


def _run_locked(
    stages: list[Stage],
    cfg: RunConfig,
    forced: set[str],
    tracker: Any,
    progress: bool,
    on_stage: Callable[[StageResult], None] | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> list[StageResult]:
    run_dir = cfg.run_dir
    for leftover in run_dir.glob(".tmp-*"):  # an interrupted earlier run (the lock says none is running)
        shutil.rmtree(leftover, ignore_errors=True)
    done: dict[str, StageResult] = {}
    for stage in stages:
        digests = {d: done[d].digest for d in stage.deps}
        key = _key(stage, cfg, digests)
        res = _cached(stage, run_dir / stage.name, key, forced)
        if res is None:
            tmp = run_dir / f".tmp-{stage.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            inputs = {d: done[d].path for d in stage.deps}
            res = _execute(stage, StageContext(cfg, tmp, inputs, tracker, progress, on_epoch), key, digests)
        done[stage.name] = res
        if on_stage is not None:
            on_stage(res)
    return list(done.values())
