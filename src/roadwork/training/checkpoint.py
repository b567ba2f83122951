"""Resumable training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

``state.safetensors`` holds the model (with its adapters), the optimizer's tensors, the EMA and best weights and
the RNG states; ``state.json`` the epoch, history, early-stopping counters, optimizer param groups, scheduler state
and a fingerprint of the configuration, so that a checkpoint of a different run is never resumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from roadwork._deps import require

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    directory: Path, *, tensors: dict[str, Any], optimizer: Any, meta: dict[str, Any]
) -> None:
    """Write a resumable checkpoint atomically: ``tensors`` (safetensors), the optimizer state and ``meta``."""
    st = require("safetensors.torch")
    directory.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if hasattr(value, "detach"):
                flat[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    body = {**meta, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
    st.save_file(flat, str(directory / "state.safetensors.tmp"))
    (directory / "state.json.tmp").write_text(json.dumps(body))
    os.replace(directory / "state.safetensors.tmp", directory / "state.safetensors")
    os.replace(directory / "state.json.tmp", directory / "state.json")  # last: its presence means complete


def load_checkpoint(
    directory: Path, fingerprint: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """``(tensors, optimizer_state_dict, meta)``, or None when there is no complete checkpoint of this run."""
    st = require("safetensors.torch")
    if not (directory / "state.json").is_file():
        return None
    meta = json.loads((directory / "state.json").read_text())
    if meta.get("fingerprint") != fingerprint:
        return None
    flat = st.load_file(str(directory / "state.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    return {k: v for k, v in flat.items() if not k.startswith("opt.")}, optimizer, meta
