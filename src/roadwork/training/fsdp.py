"""FSDP2 (``fully_shard``) through Lightning Fabric: ``train.devices=N train.strategy=fsdp``.

Each transformer block (timm ``blocks``, transformers ``layer`` lists) and then the whole model are sharded over
the data-parallel mesh, so parameters, gradients and optimizer state are split across processes — for backbones
whose weights do not fit one device. Processes are spawned from here (as for DDP) so the CLI, Python and notebooks
all work; on CPU the process group is gloo. Every process computes the same global batch split as DDP does, so N
processes train like one with an N-times larger batch (tested against one process within tolerance).

What FSDP2 does not support here yet: EMA weights, ``torch.compile`` and resumable checkpoints (each would need
the full state gathered from every process at every epoch); ``train.ema``/``train.compile`` are refused with a
ConfigError and no checkpoint is written (a warning says so). At the end the shards are gathered into one full
state dict on rank 0, loaded into an ordinary (unsharded, adapters merged) network there and saved; the spawning
process reads it back, as with DDP.
"""

from __future__ import annotations

from typing import Any

from lightning_fabric.strategies import ModelParallelStrategy
from lightning_fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from roadwork._deps import require

__all__ = ["fsdp_strategy", "full_state_dict", "parallelize"]


def _block_lists(module: Any) -> list[Any]:
    torch = require("torch")
    lists = []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential) and name.rsplit(".", 1)[-1] in (
            "blocks",
            "layer",
            "layers",
        ):
            lists.append(child)
    return lists


def parallelize(module: Any, device_mesh: Any) -> Any:
    """Shard every block, then the root (the embeddings, norms and head stay with the root's group)."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for blocks in _block_lists(module):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


class _SpawnFSDP2(ModelParallelStrategy):
    """Fabric's ModelParallelStrategy (FSDP2) with processes spawned from this one, as ``ddp_spawn`` does (the
    stock launcher re-runs the script, which a CLI command or a notebook cannot do)."""

    def _configure_launcher(self) -> None:
        self._launcher = _MultiProcessingLauncher(self, start_method="spawn")


def fsdp_strategy(devices: int) -> Any:
    """Lightning Fabric's FSDP2 strategy over ``devices`` processes (``fully_shard`` per block, spawned)."""
    return _SpawnFSDP2(parallelize_fn=parallelize, data_parallel_size=devices, tensor_parallel_size=1)


def full_state_dict(module: Any) -> dict[str, Any]:
    """The unsharded state dict on CPU, on rank 0 (the others get an empty dict); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return dict(
        get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    )
