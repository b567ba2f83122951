"""Which recipe a run on the user's own photos gets when it names none, and the up-front check of its weights.

``roadwork run data.source=FOLDER`` with no CONFIG and no ``model.backbone`` trains:

- the pretrained recipe, ``finetune-gpu`` where CUDA is present and ``finetune-cpu`` otherwise, when pretrained
  weights will be used (the hub's, or ``model.weights=FILE``);
- the ``scratch`` recipe when none will be (``model.pretrained=false`` and no ``model.weights``): the fine-tuning
  recipes from random weights stay at chance on small real sets (ConvNeXt-Atto with finetune-cpu: validation loss
  at ln 2, 0.576 test accuracy on 535 training photos), a slim ResNet-10-T learns (see configs/scratch.yaml).

Every other key (``model.weights=FILE``, ``train.epochs=3``) still applies on top of it. ``roadwork config show``
resolves the same way (:func:`resolve_config`), so it prints exactly what ``roadwork run`` trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roadwork.config import RunConfig, load_config, parse_overrides

__all__ = ["FINETUNE_RECIPES", "check_run_weights", "default_recipe", "resolve_config", "run_config"]

FINETUNE_RECIPES = ("finetune-cpu", "finetune-gpu")
"""The presets that fine-tune a pretrained backbone (from random weights they learn next to nothing)."""
SCRATCH_RECIPE = "scratch"


def _no_pretrained_weights(values: dict[str, Any]) -> bool:
    """``model.pretrained=false`` and no ``model.weights`` among the overrides: nothing pretrained will load."""
    model = values.get("model") or {}
    return model.get("pretrained") is False and not model.get("weights")


def _cuda_present() -> bool:
    """An NVIDIA driver on this machine and torch sees a device (torch is imported only when a driver is there)."""
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def default_recipe(
    config: str | Path | None, overrides: list[str] | dict[str, Any] | None, *, cuda: bool | None = None
) -> tuple[str, str] | None:
    """``(preset, log line)`` when a run on the user's own data names no config and no ``model.backbone``;
    None otherwise (a CONFIG given, synthetic data, or a backbone named)."""
    if config is not None:
        return None
    values = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    source = (values.get("data") or {}).get("source", "synthetic")
    if not isinstance(source, str) or source == "synthetic":
        return None
    if "backbone" in (values.get("model") or {}):
        return None
    if _no_pretrained_weights(values):
        return SCRATCH_RECIPE, (
            f"no pretrained weights (model.pretrained=false): using the from-scratch recipe {SCRATCH_RECIPE} "
            f"(configs/{SCRATCH_RECIPE}.yaml: a slim ResNet-10-T from random weights). Expect far less than a "
            "pretrained backbone gives: pass model.weights=FILE (or go online once) for finetune-cpu/finetune-gpu."
        )
    gpu = _cuda_present() if cuda is None else cuda
    preset = "finetune-gpu" if gpu else "finetune-cpu"
    where = "a CUDA device is present" if gpu else "no CUDA device here"
    return preset, (
        f"no model named: using the pretrained recipe {preset} ({where}; configs/{preset}.yaml). "
        "Name a CONFIG or model.backbone=... to choose another."
    )


def check_run_weights(cfg: RunConfig, until: str | None = None) -> str:
    """Before any stage runs: the hub weights the train stage will need are cached or reachable (else a
    :class:`~roadwork.errors.ConfigError` naming ``model.weights=FILE`` and ``model.pretrained=false``, in
    seconds). Skipped when the run stops before training."""
    if until == "data":
        return "not needed"
    from roadwork.models.hub import check_pretrained

    return check_pretrained(cfg.model)


def _scratch_advice(config: str | Path | None, overrides: list[str]) -> str:
    """The command that trains from random weights and learns: these arguments with the scratch recipe."""
    keep = [o for o in overrides if o.partition("=")[0].strip() not in ("model.pretrained", "model.backbone")]
    if config is None:
        return "roadwork run " + " ".join([*keep, "model.pretrained=false"])
    return "roadwork run " + " ".join([SCRATCH_RECIPE, *keep])


def resolve_config(config: str | Path | None, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The configuration ``roadwork run`` uses for these arguments (recipe selection included) and what it says
    about the choice (lines for stderr); shared by ``roadwork run`` and ``roadwork config show``."""
    notes: list[str] = []
    picked = default_recipe(config, overrides)
    if picked is not None:
        config = picked[0]
        notes.append(picked[1])
    cfg = load_config(config, overrides)
    if (
        str(config) in FINETUNE_RECIPES
        and not cfg.model.pretrained
        and cfg.model.weights is None
        and cfg.data.source != "synthetic"
    ):
        notes.append(
            f"warning: {config} fine-tunes a pretrained backbone; from random weights (model.pretrained=false) it "
            "stays near chance on small sets (ConvNeXt-Atto: 0.576 on 1,079 real photos). For random weights "
            f"use the from-scratch recipe: {_scratch_advice(config, overrides)}"
        )
    return cfg, notes


def run_config(config: str | Path | None, overrides: list[str], until: str | None = None) -> RunConfig:
    """The config of ``roadwork run``: :func:`resolve_config` (its notes said on stderr), then
    :func:`check_run_weights` — every failure here comes before any stage runs. Hub weights that cannot be had
    fail with the command that trains without them."""
    import sys

    from roadwork.errors import ConfigError

    cfg, notes = resolve_config(config, overrides)
    for line in notes:
        print(line, file=sys.stderr, flush=True)
    try:
        check_run_weights(cfg, until)
    except ConfigError as e:
        raise ConfigError(
            f"{e} Without pretrained weights, this trains the from-scratch recipe: "
            f"{_scratch_advice(config, overrides)}"
        ) from None
    return cfg
