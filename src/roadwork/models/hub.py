"""Is a backbone's pretrained checkpoint reachable? Answered in seconds, before any heavy work.

``timm.create_model(..., pretrained=True)`` on a machine without network asks ``huggingface_hub`` for the file,
which retries every HEAD request five times with exponential backoff, for ``model.safetensors`` and then for
``pytorch_model.bin``: about 50 s before it gives up (measured here, no DNS), after the data stage has scanned
every image. :func:`check_pretrained` asks once, up front, without torch or timm:

1. the file in the local hub cache (``huggingface_hub.try_to_load_from_cache``): fine, nothing is fetched;
2. ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) and not cached: fail at once, no request is made;
3. otherwise one HEAD request for the file (``get_hf_file_metadata``, ``retry_on_errors=False``, a short timeout):
   any error fails with the message that offers ``model.weights=FILE`` or ``model.pretrained=false``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from roadwork.config import ModelConfig
from roadwork.errors import ConfigError

__all__ = ["HubFile", "check_pretrained", "hub_file"]

# the files timm (hf_hub_id) and transformers (from_pretrained) read first
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_HF_FILES = ("config.json", "model.safetensors")


class HubFile:
    """A repository on the Hugging Face hub and the files a backbone loads from it."""

    def __init__(self, repo_id: str, filenames: tuple[str, ...]) -> None:
        self.repo_id, self.filenames = repo_id, filenames

    def __repr__(self) -> str:
        return f"HubFile({self.repo_id!r}, {self.filenames!r})"


def _timm_repo(name: str) -> str | None:
    """``timm/<arch>.<tag>`` for a tagged name (timm's convention for every hub checkpoint); timm's own answer for
    an untagged one (imports timm: only then)."""
    if re.fullmatch(r"[\w-]+\.[\w-]+", name):
        return f"timm/{name}"
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def hub_file(backbone: str) -> HubFile | None:
    """The hub repository ``model.backbone`` loads pretrained weights from; None where there is none (a local
    folder, an ``hf:<model type>``, a timm model without a hub checkpoint)."""
    if backbone.startswith("hf:"):
        source = backbone[3:].strip()
        if "/" not in source or Path(source).exists():
            return None
        return HubFile(source, _HF_FILES)
    repo = _timm_repo(backbone)
    return HubFile(repo, _TIMM_FILES) if repo else None


def _cached(f: HubFile) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(f.repo_id, name) for name in f.filenames]
    if f.filenames == _HF_FILES:  # transformers needs the config and the weights
        return all(isinstance(p, str) for p in found)
    return any(isinstance(p, str) for p in found)


def _offline() -> bool:
    from huggingface_hub import constants

    on = ("1", "ON", "YES", "TRUE")
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in on


def _error(cfg: ModelConfig, f: HubFile, why: str) -> ConfigError:
    return ConfigError(
        f"model.pretrained=true needs the weights of model.backbone={cfg.backbone!r} from the Hugging Face hub "
        f"({f.repo_id}), and {why}. Pass model.weights=FILE (a .safetensors state dict of the same backbone"
        f"{', or a save_pretrained folder' if cfg.backbone.startswith('hf:') else ''}), or set "
        "model.pretrained=false to train from random weights. "
        "Online once, the weights are cached for later offline runs."
    )


def check_pretrained(cfg: ModelConfig, *, timeout: float = 3.0) -> str:
    """Raise :class:`~roadwork.errors.ConfigError` at once when ``cfg`` asks for hub weights that are neither
    cached nor reachable; return how they will be found (``"not needed"``, ``"cached"``, ``"reachable"``).
    One HEAD request at most, no retries, ``timeout`` seconds; none at all with ``HF_HUB_OFFLINE=1``."""
    if not cfg.pretrained or cfg.weights is not None:
        return "not needed"
    f = hub_file(cfg.backbone)
    if f is None:
        return "not needed"
    if _cached(f):
        return "cached"
    if _offline():
        raise _error(cfg, f, "HF_HUB_OFFLINE is set and they are not in the local cache")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(f.repo_id, f.filenames[0]), timeout=timeout, retry_on_errors=False)
    except Exception as e:  # no DNS, refused, timed out, 404, 401: not usable here
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise _error(
            cfg,
            f,
            f"the hub cannot be reached from here ({type(e).__name__}: {reason}) and they are not cached",
        ) from None
    return "reachable"
