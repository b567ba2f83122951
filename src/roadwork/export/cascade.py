"""Running and timing cascade stages on decoded images (no torch): what the bundle, the server, the cascade
stage's cost measurement and ``benchmarks/cascade_cost.py`` share.

Each stage starts from the decoded image and does its own resizing, exactly as in training, so a stage's
cost includes its preprocessing (feature extraction for the boosting stage) and excludes decoding, which
every path pays once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from roadwork.data.features import images_features
from roadwork.data.preprocess import PreprocessSpec, preprocess
from roadwork.export.onnx import onnx_logits, onnx_session
from roadwork.jsonio import parse_artifact
from roadwork.models.trees import TreeEnsemble

__all__ = ["StageRunner", "count_flops", "measure_cost_ms"]


@dataclass
class StageRunner:
    """Logits of one stage from PIL images: a tree ensemble on cheap features, or an ONNX network."""

    kind: str
    trees: TreeEnsemble | None = None
    session: Any = None
    spec: PreprocessSpec | None = None

    @classmethod
    def boosting(cls, path: Path) -> StageRunner:
        """A tree-table stage from its JSON file; a malformed one is an :class:`~roadwork.errors.ArtifactError`."""
        trees = parse_artifact(
            Path(path).read_bytes(),
            TreeEnsemble.from_dict,
            where=str(path),
            what="tree table",
            fix="Rerun the cascade stage, or re-export the bundle.",
        )
        return cls("boosting", trees=trees)

    @classmethod
    def network(
        cls, onnx_path: Path, spec: PreprocessSpec, *, threads: int = 0, spin: bool = True
    ) -> StageRunner:
        return cls("network", session=onnx_session(onnx_path, threads=threads, spin=spin), spec=spec)

    def logits(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        """float64 logits (N, K) of this stage: the tree table on colour features, or the network."""
        out = [
            self.logits_of(self.inputs(images[i : i + batch_size]), batch_size=batch_size)
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0))

    def inputs(self, images: Sequence[Image.Image]) -> np.ndarray:
        """What this stage runs on: colour features (trees) or preprocessed pixels (a network)."""
        if self.kind == "boosting":
            return images_features(images)
        assert self.spec is not None
        return preprocess(list(images), self.spec)

    def logits_of(self, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """float64 logits (N, K) from :meth:`inputs`."""
        if self.kind == "boosting":
            assert self.trees is not None
            return self.trees.logits(x)
        return onnx_logits(self.session, x, batch_size=batch_size)


def measure_cost_ms(
    runner: StageRunner, images: Sequence[Image.Image], *, batch: int = 32, repeats: int = 5
) -> float:
    """Median over ``repeats`` passes of ms per image, in batches of ``batch`` (one warm-up pass first)."""
    images = list(images)
    runner.logits(images[:batch], batch_size=batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            runner.logits(images[i : i + batch], batch_size=batch)
        times.append((time.perf_counter() - t0) * 1000 / max(len(images), 1))
    return float(np.median(times))


def count_flops(model: Any, size: int) -> float | None:
    """Floating-point operations of one forward pass on one image (torch's FlopCounterMode); None if unknown."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        was = model.training
        model.eval()
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size))
        model.train(was)
        return float(counter.get_total_flops())
    except Exception:  # a model the counter cannot trace: the cost in ms still stands
        return None
