"""Backbone factory: timm names or ``hf:`` transformers models, hub weights when online, local weights when not.

``model.json`` (:class:`ModelCard`) carries everything needed to rebuild the network and feed it:
architecture, class names and the :class:`~roadwork.data.preprocess.PreprocessSpec`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadwork._deps import require
from roadwork.config import ModelConfig
from roadwork.data.preprocess import PreprocessSpec
from roadwork.errors import ArtifactError, ConfigError
from roadwork.jsonio import parse_artifact

__all__ = [
    "BACKBONE_PREFIX",
    "MODEL_SCHEMA",
    "ModelCard",
    "card_kwargs",
    "create_model",
    "load_model",
    "load_weights_into",
    "network_for_card",
    "save_model",
]

MODEL_SCHEMA = 1
"""The version of ``model.json``."""


@dataclass(frozen=True)
class ModelCard:
    """What ``model.json`` holds: architecture, class names, preprocessing, head, pooling and deferral gate."""

    backbone: str
    classes: list[str]
    preprocess: PreprocessSpec
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    head: str = "linear"
    pooling: str = "default"
    gate: bool = False  # one extra output after the class logits: a learned deferral gate (cascades)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MODEL_SCHEMA,
            "backbone": self.backbone,
            "classes": self.classes,
            "drop_rate": self.drop_rate,
            "kwargs": self.kwargs,
            "head": self.head,
            "pooling": self.pooling,
            "gate": self.gate,
            "preprocess": self.preprocess.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        if d.get("schema") != MODEL_SCHEMA:
            raise ArtifactError(f"model.json schema {d.get('schema')!r} is not {MODEL_SCHEMA}.")
        c = d["classes"]
        if not (isinstance(c, list) and c and all(isinstance(n, str) for n in c) and len(set(c)) == len(c)):
            raise ArtifactError(
                f"its 'classes' is {str(c)[:80]!r}, not a list of class names (non-empty, distinct)"
            )
        return cls(
            backbone=d["backbone"],
            classes=list(d["classes"]),
            preprocess=PreprocessSpec.from_dict(d["preprocess"]),
            drop_rate=float(d.get("drop_rate", 0)),
            kwargs=dict(d.get("kwargs", {})),
            head=str(d.get("head", "linear")),
            pooling=str(d.get("pooling", "default")),
            gate=bool(d.get("gate", False)),
        )

    @classmethod
    def load(cls, path: str | Path, *, where: str | None = None) -> ModelCard:
        """The card in ``model.json``; an unreadable or malformed file is an :class:`ArtifactError` naming
        ``where`` (default: ``path``)."""
        where = str(path) if where is None else where
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ArtifactError(f"Could not read model card {where!r}: {e.strerror or e}.") from None
        return parse_artifact(
            data, cls.from_dict, where=where, what="model card", fix="Re-export the bundle (or retrain)."
        )


def _unknown_backbone(name: str) -> ConfigError:
    timm = require("timm")
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else " See timm.list_models()."
    return ConfigError(f"Unknown backbone model.backbone={name!r}.{hint}")


BACKBONE_PREFIX = "backbone."
"""Where a :class:`~roadwork.models.heads.PooledClassifier` (or an ``hf:`` classifier) keeps its backbone's tensors."""


def _head_prefixes(model: Any) -> tuple[str, ...]:
    """State-dict prefixes of the classifier head: ours (``get_classifier``) and the one timm's pretrained config
    names (a checkpoint's 1000-class head), under the backbone prefix too."""
    names = {"head."} if hasattr(model, "head") and hasattr(model, "backbone") else set()
    for owner, prefix in ((model, ""), (getattr(model, "backbone", None), BACKBONE_PREFIX)):
        classifier = (getattr(owner, "pretrained_cfg", None) or {}).get("classifier")
        for c in (classifier,) if isinstance(classifier, str) else (classifier or ()):
            names.add(f"{prefix}{c}.")
    return tuple(sorted(names))


def load_weights_into(model: Any, state: dict[str, Any], *, strict: bool = True, source: str) -> list[str]:
    """Load ``state`` into ``model`` by name and shape and return the keys that were skipped.

    The classifier head is the one part allowed not to fit (a checkpoint's head has its own class count). A
    backbone state (names without :data:`BACKBONE_PREFIX`) is matched under that prefix. Anything else that does
    not fit — a tensor the model has not, one of another shape, a model tensor the state lacks — raises a
    :class:`~roadwork.errors.ConfigError` listing it; with ``strict=False`` (``model.strict=false``) what fits is
    loaded and every skipped key is listed in a :class:`~roadwork.errors.RoadworkWarning`."""
    own = model.state_dict()
    if not any(k in own for k in state) and any(BACKBONE_PREFIX + k in own for k in state):
        state = {BACKBONE_PREFIX + k: v for k, v in state.items()}
    heads = _head_prefixes(model)
    fits = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not fits:
        raise ConfigError(
            f"{source} shares no tensor (name and shape) with backbone {type(model).__name__}; check "
            "model.backbone matches the weights."
        )
    unexpected = sorted(k for k in state if k not in own and not k.startswith(heads))
    reshaped = sorted(k for k in state if k in own and k not in fits and not k.startswith(heads))
    missing = sorted(k for k in own if k not in state and not k.startswith(heads))
    skipped = unexpected + reshaped + missing
    if skipped:
        detail = "; ".join(
            f"{what} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for what, keys in (
                ("not in the model", unexpected),
                ("of another shape", reshaped),
                ("missing from the weights, left at their initial values", missing),
            )
            if keys
        )
        if strict:
            raise ConfigError(
                f"{source} does not fit model.backbone: {detail}. Check model.backbone (and model.kwargs) match "
                f"the weights, or set model.strict=false to load the {len(fits)} tensors that fit and skip the rest "
                "(they are listed when loading)."
            )
        import warnings

        from roadwork.errors import RoadworkWarning

        warnings.warn(
            RoadworkWarning(
                f"model.strict=false: loaded {len(fits)} tensors from {source}; skipped {detail}."
            ),
            stacklevel=2,
        )
    model.load_state_dict(fits, strict=False)
    return skipped


def _load_weights(model: Any, path: str, strict: bool) -> None:
    st = require("safetensors.torch")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights={path!r} does not exist; pass the path of a .safetensors file.")
    try:
        state = st.load_file(str(p))
    except Exception as e:
        raise ConfigError(f"model.weights={path!r} is not a readable safetensors file ({e}).") from None
    load_weights_into(model, state, strict=strict, source=f"model.weights={path!r}")


def create_model(cfg: ModelConfig, num_classes: int) -> tuple[Any, PreprocessSpec]:
    """Build the network and its preprocessing. Hub weights only when ``pretrained`` and no local file."""
    from roadwork.models.hf import hf_preprocess, is_hf
    from roadwork.models.network import build_network  # imports torch: only where a network is built

    timm = require("timm")
    from_hub = cfg.pretrained and cfg.weights is None
    hf = is_hf(cfg.backbone)
    try:
        model = build_network(
            cfg.backbone,
            num_classes,
            drop_rate=cfg.drop_rate,
            kwargs=cfg.kwargs,
            head=cfg.head,
            pooling=cfg.pooling,
            pretrained=from_hub,
            weights=cfg.weights,  # read by hf: backbones only (a save_pretrained folder)
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise _unknown_backbone(cfg.backbone) from None
        raise
    except TypeError as e:  # an unknown keyword in model.kwargs
        raise ConfigError(f"model.kwargs={cfg.kwargs!r} is not accepted by {cfg.backbone!r}: {e}") from None
    except OSError as e:  # huggingface_hub's offline/connection errors are OSErrors
        raise ConfigError(
            f"Could not download pretrained weights for model.backbone={cfg.backbone!r} ({type(e).__name__}); "
            "this machine may be offline. Pass model.weights=PATH to a local .safetensors file, or set "
            "model.pretrained=false to start from random weights."
        ) from None
    if cfg.weights is not None and not (hf and Path(cfg.weights).is_dir()):
        _load_weights(model.backbone if hf else model, cfg.weights, cfg.strict)
    if hf:
        if cfg.pretrained or cfg.weights is not None:
            return model, hf_preprocess(cfg.backbone, cfg.weights, cfg.image_size)
        return model, PreprocessSpec(size=cfg.image_size)
    if cfg.pretrained or cfg.weights is not None:
        dc = timm.data.resolve_data_config(model=model)
        spec = PreprocessSpec(
            size=cfg.image_size,
            crop_pct=float(dc.get("crop_pct", 1.0)),
            interpolation=dc.get("interpolation", "bilinear"),
            mean=tuple(dc["mean"]),
            std=tuple(dc["std"]),
        )
    else:
        spec = PreprocessSpec(size=cfg.image_size)
    return model, spec


def card_kwargs(model: Any, cfg: ModelConfig) -> dict[str, Any]:
    """What ``model.json`` keeps to rebuild the network: ``model.kwargs``, or a ``hf:`` backbone's whole config."""
    return dict(getattr(model, "card_kwargs", None) or cfg.kwargs)


def save_model(model: Any, card: ModelCard, out_dir: Path) -> None:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir``."""
    st = require("safetensors.torch")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    st.save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "model.json").write_text(json.dumps(card.to_dict(), indent=2))


def network_for_card(card: ModelCard) -> Any:
    """The untrained network a card describes (backbone, classes + gate, head, pooling): load weights into it."""
    from roadwork.models.network import build_network  # imports torch: only where a network is built

    return build_network(
        card.backbone,
        len(card.classes) + card.gate,
        drop_rate=card.drop_rate,
        kwargs=card.kwargs,
        head=card.head,
        pooling=card.pooling,
    )


def load_model(model_dir: str | Path) -> tuple[Any, ModelCard]:
    """Rebuild a trained network from ``model.safetensors`` + ``model.json`` (eval mode, CPU)."""
    require("timm")
    st = require("safetensors.torch")
    d = Path(model_dir)
    card = ModelCard.load(d / "model.json")
    model = network_for_card(card)
    try:
        model.load_state_dict(st.load_file(str(d / "model.safetensors")))
    except Exception as e:
        raise ArtifactError(f"Could not load weights from {str(d / 'model.safetensors')!r}: {e}") from None
    return model.eval(), card
