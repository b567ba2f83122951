"""Run the main job: the stage graph, cached, tracked in MLflow."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadwork.config import RunConfig
from roadwork.errors import ConfigError, DataError
from roadwork.pipeline.runner import StageResult, run_stages
from roadwork.pipeline.stages import STAGES

__all__ = ["STAGE_NAMES", "RunResult", "run_pipeline"]

STAGE_NAMES = [s.name for s in STAGES]
"""The stages in graph order (what --force and --until take)."""


@dataclass
class RunResult:
    """What :func:`run_pipeline` returns: the run folder, each stage's result, and where the outputs are."""

    run_dir: Path
    stages: list[StageResult]
    tracking_uri: str | None = None
    registered: str | None = None  # models:/NAME/VERSION when tracking.register_as is set

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The evaluate stage's metrics.json (None when the run stopped before it)."""
        p = self.run_dir / "evaluate" / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def report(self) -> Path:
        """The HTML report's path."""
        return self.run_dir / "evaluate" / "report.html"

    @property
    def bundle(self) -> Path:
        """The exported bundle's folder."""
        return self.run_dir / "export" / "bundle"


def run_pipeline(
    cfg: RunConfig,
    *,
    force: Sequence[str] = (),
    until: str | None = None,
    progress: bool = True,
    on_stage: Callable[[StageResult], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Run (or reuse from cache) every stage up to ``until``; ``force`` re-runs stages and their dependents."""
    unknown = [s for s in [*force, *([until] if until else [])] if s not in STAGE_NAMES]
    if unknown:  # fail before any work (and before an MLflow run is opened)
        raise ConfigError(f"Unknown stage {unknown[0]!r}; the stages are: {', '.join(STAGE_NAMES)}.")
    if cfg.data.source != "synthetic" and not Path(cfg.data.source).exists():
        raise DataError(
            f"data.source={cfg.data.source!r} does not exist. Pass 'synthetic', an image folder with one "
            "subfolder per class, or a .csv/.parquet manifest with 'path' and 'label' columns."
        )
    tracker = None
    if cfg.tracking.enabled:
        from roadwork.pipeline.tracking import Tracker

        tracker = Tracker(cfg, until=until)
    try:
        results = run_stages(
            STAGES,
            cfg,
            force=force,
            until=until,
            tracker=tracker,
            progress=progress,
            on_stage=on_stage,
            on_epoch=on_epoch,
        )
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    out = RunResult(cfg.run_dir, results, tracker.uri if tracker else None)
    if tracker is not None:
        tracker.set_tags({f"stage.{r.name}": "cached" if r.cached else "ran" for r in results})
        m = out.metrics
        if m is not None:
            tracker.log_metrics({k: m[k] for k in ("test", "conformal", "selective", "timing")})
            tracker.log_artifact(out.report, "report")
            tracker.log_artifact(cfg.run_dir / "evaluate" / "MODEL_CARD.md", "report")
        if out.bundle.is_dir():
            tracker.log_artifact(out.bundle, "bundle")
            if cfg.tracking.register_as:
                from roadwork.pipeline.registry import log_bundle

                out.registered = log_bundle(out.bundle, registered_name=cfg.tracking.register_as)
        tracker.end()
    return out
