"""``roadwork sweep``: search training and trust settings with Optuna (TPE, median pruning on validation loss).

The search space is a YAML file of dotted config keys::

    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.lora_rank: {type: int, low: 4, high: 32}
    calibrate.method: {type: categorical, choices: [temperature, vector, isotonic]}
    conformal.alpha: {type: categorical, choices: [0.05, 0.1]}

Every trial is a full pipeline run named ``<name>-t<number>`` (so an MLflow run, and stages shared between
trials — the data — are cache hits); the objective is the trained model's best validation loss unless
``metric=`` names a key of ``metrics.json`` (e.g. ``conformal.mean_set_size``; those are measured on the test
split, so use them to compare, not to select, or keep a final held-out set). The study lives in SQLite under
the runs folder, so an interrupted sweep continues where it stopped; the best trial's configuration is written
to ``runs/<name>-sweep/best.yaml`` and ``roadwork run runs/<name>-sweep/best.yaml`` re-runs it.

``engine=ray`` runs the same search on Ray Tune (``OptunaSearch`` with the same space, ASHA stopping on the
validation loss each epoch reports), one trial per Ray worker; an interrupted Tune experiment resumes from
``runs/<name>-sweep/tune`` (``Tuner.restore``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.config import RunConfig, dump_config, load_config, parse_overrides, yaml_load
from roadwork.errors import ConfigError

__all__ = ["load_space", "run_sweep", "run_sweep_ray"]

_TYPES = ("float", "int", "categorical")


def load_space(path: str | Path, cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Read and check a search space: every key must be a config key, every spec well formed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"space={str(path)!r} does not exist; pass a YAML file of dotted keys → ranges.")
    space = yaml_load(p.read_text()) or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"space={str(path)!r} must map dotted config keys to ranges, e.g. train.lr: {{type: float, low: 1e-4, high: 1e-2}}."
        )
    for key, spec in space.items():
        value: Any = cfg
        for part in str(key).split("."):
            if not hasattr(value, part):
                raise ConfigError(f"space key {key!r} is not a config key (see 'roadwork config show').")
            value = getattr(value, part)
        if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
            raise ConfigError(f"space[{key!r}] needs type: float, int or categorical (got {spec!r}).")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ConfigError(f"space[{key!r}] is categorical and needs a non-empty 'choices' list.")
        if spec["type"] in ("float", "int") and not (
            "low" in spec and "high" in spec and spec["low"] < spec["high"]
        ):
            raise ConfigError(f"space[{key!r}] needs low < high.")
    return space


def _suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "float":
        return trial.suggest_float(
            key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False))
        )
    if spec["type"] == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
    return trial.suggest_categorical(key, list(spec["choices"]))


def _nested_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s values set, nested dicts merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _nested_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _with(base: dict[str, Any], values: dict[str, Any]) -> RunConfig:
    """``base`` (a dumped config) with dotted keys set: validated like any override."""
    extra = parse_overrides([f"{k}={json.dumps(v)}" for k, v in values.items()])
    return load_config(None, _nested_update(base, extra))


def _metric(metrics: dict[str, Any], key: str) -> float:
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(
                f"metric={key!r} is not a key of metrics.json (e.g. test.accuracy, conformal.mean_set_size)."
            )
        value = value[part]
    return float(value)


def run_sweep(
    cfg: RunConfig,
    space: dict[str, dict[str, Any]],
    *,
    trials: int,
    metric: str = "val_loss",
    direction: str = "minimize",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Run trials until the study holds ``trials`` finished ones (a resumed sweep runs only the rest)."""
    optuna = require("optuna")
    from roadwork.pipeline import run_pipeline

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = Path(cfg.root) / f"{cfg.name}-sweep"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    study = optuna.create_study(
        study_name=cfg.name,
        storage=storage,
        load_if_exists=True,
        direction=direction,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    base = cfg.model_dump(mode="json")

    def objective(trial: Any) -> float:
        values = {key: _suggest(trial, key, spec) for key, spec in space.items()}
        trial_cfg = _with(base, {**values, "name": f"{cfg.name}-t{trial.number}"})

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            trial.report(row["val_loss"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_pipeline(trial_cfg, progress=progress, on_epoch=on_epoch)
        trial.set_user_attr("run_dir", str(result.run_dir))
        if metric == "val_loss":
            hist = json.loads((result.run_dir / "train" / "history.json").read_text())
            return float(min(r["val_loss"] for r in hist))
        return _metric(result.metrics or {}, metric)

    done = [t for t in study.trials if t.state.is_finished()]
    remaining = max(trials - len(done), 0)
    if remaining:
        study.optimize(objective, n_trials=remaining, catch=())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError("no sweep trial completed (all pruned or failed); widen the space or add trials.")
    best = study.best_trial
    best_cfg = _with(base, {**best.params, "name": f"{cfg.name}-best"})
    (sweep_dir / "best.yaml").write_text(dump_config(best_cfg))
    rows = [{"trial": t.number, "state": t.state.name, "value": t.value, **t.params} for t in study.trials]
    (sweep_dir / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    return {
        "best": {"trial": best.number, "value": best.value, "params": best.params},
        "trials": rows,
        "dir": str(sweep_dir),
    }


def _to_tune(tune: Any, spec: dict[str, Any]) -> Any:
    """One search-space entry (float/int/categorical) as a Ray Tune distribution."""
    if spec["type"] == "float":
        return (tune.loguniform if spec.get("log") else tune.uniform)(float(spec["low"]), float(spec["high"]))
    if spec["type"] == "int":
        return tune.randint(int(spec["low"]), int(spec["high"]) + 1)
    return tune.choice(list(spec["choices"]))


def _tune_rows(grid: Any, space: dict[str, Any], metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per Ray Tune trial: its folder name, best value of ``metric`` and its parameters."""
    rows = []
    for i in range(len(grid)):
        r = grid[i]
        frame = r.metrics_dataframe
        series = [] if frame is None or metric not in frame else list(frame[metric])
        rows.append(
            {
                "trial": Path(r.path).name if r.path else None,
                "value": (min(series) if mode == "min" else max(series)) if series else None,
                **{k: (r.config or {}).get(k) for k in space},
            }
        )
    return rows


def run_sweep_ray(
    cfg: RunConfig,
    space: dict[str, dict[str, Any]],
    *,
    trials: int,
    metric: str = "val_loss",
    direction: str = "minimize",
    seed: int = 0,
    cpus_per_trial: float = 1,
) -> dict[str, Any]:
    """The sweep on Ray Tune (``ray.init`` first to use a cluster; a local one is started otherwise)."""
    ray = require("ray")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from roadwork.pipeline import run_pipeline

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    sweep_dir = (Path(cfg.root) / f"{cfg.name}-sweep").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.model_dump(mode="json")
    base["root"] = str(Path(cfg.root).resolve())  # trials run in Ray's own working directories
    mode = "min" if direction == "minimize" else "max"

    def trainable(config: dict[str, Any]) -> None:
        number = tune.get_context().get_trial_id()
        trial_cfg = _with(base, {**config, "name": f"{cfg.name}-{number}"})

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            if metric == "val_loss":
                tune.report({"val_loss": row["val_loss"], "epoch": epoch})

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_pipeline(trial_cfg, progress=False, on_epoch=on_epoch)
        if metric != "val_loss":
            tune.report({metric: _metric(result.metrics or {}, metric), "run_dir": str(result.run_dir)})

    tune_dir = sweep_dir / "tune"
    resources = tune.with_resources(trainable, {"cpu": cpus_per_trial})
    if tune.Tuner.can_restore(str(tune_dir / cfg.name)):
        tuner = tune.Tuner.restore(str(tune_dir / cfg.name), trainable=resources, resume_errored=True)
    else:
        tuner = tune.Tuner(
            resources,
            param_space={key: _to_tune(tune, spec) for key, spec in space.items()},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=trials,
                search_alg=OptunaSearch(seed=seed),
                scheduler=ASHAScheduler(grace_period=1) if metric == "val_loss" else None,
            ),
            run_config=tune.RunConfig(name=cfg.name, storage_path=str(tune_dir), verbose=0),
        )
    grid: Any = tuner.fit()
    best: Any = grid.get_best_result(metric=metric, mode=mode, scope="all")
    params = {k: best.config[k] for k in space}
    (sweep_dir / "best.yaml").write_text(dump_config(_with(base, {**params, "name": f"{cfg.name}-best"})))
    rows = _tune_rows(grid, space, metric, mode)
    (sweep_dir / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    frame = best.metrics_dataframe
    values = list(frame[metric]) if frame is not None else [best.metrics[metric]]
    value = min(values) if mode == "min" else max(values)
    return {"best": {"value": float(value), "params": params}, "trials": rows, "dir": str(sweep_dir)}
