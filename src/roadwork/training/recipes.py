"""Which recipe a run on the user's own photos gets when it names none, and the up-front check of its weights.

``roadwork run data.source=FOLDER`` with no CONFIG and no ``model.backbone`` trains the pretrained recipe, not the
demo's random-weight CNN at 96 px (0.657 test accuracy on real photos): ``finetune-gpu`` where CUDA is present,
``finetune-cpu`` otherwise. Every other key (``model.pretrained=false``, ``model.weights=FILE``,
``train.epochs=3``) still applies on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roadwork.config import RunConfig, load_config, parse_overrides

__all__ = ["check_run_weights", "default_recipe", "run_config"]


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


def run_config(config: str | Path | None, overrides: list[str], until: str | None = None) -> RunConfig:
    """The config of ``roadwork run``: :func:`default_recipe` (said on stderr) ← ``overrides``, validated, then
    :func:`check_run_weights` — every failure here comes before any stage runs."""
    import sys

    picked = default_recipe(config, overrides)
    if picked is not None:
        config = picked[0]
        print(picked[1], file=sys.stderr, flush=True)
    cfg = load_config(config, overrides)
    check_run_weights(cfg, until)
    return cfg
