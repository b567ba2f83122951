"""A tree ensemble as plain arrays, evaluated in numpy: how a gradient-boosting stage is stored and served.

Every framework (scikit-learn, XGBoost, LightGBM, CatBoost — see :mod:`roadwork.models.boosting`) is
converted to the same node table, saved as JSON in the bundle and evaluated here, so serving needs neither
the framework nor pickle, and training, evaluation and serving run the same code. We tried the ONNX
converters first: skl2onnx and onnxmltools both failed on current scikit-learn/XGBoost releases, and a
converter that breaks on every framework release is a poor contract for a bundle.

Evaluation walks all trees of all rows together, one tree level per step (``depth`` vectorised steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from roadwork.errors import ArtifactError, InputError

__all__ = ["NodeTable", "TreeEnsemble", "margins_to_logits"]


def margins_to_logits(raw: np.ndarray) -> np.ndarray:
    """Boosting raw scores → logits: one binary margin m becomes [0, m] (softmax of it = sigmoid(m))."""
    return np.concatenate([np.zeros_like(raw), raw], axis=1) if raw.shape[1] == 1 else raw


@dataclass
class TreeEnsemble:
    """Nodes of all trees in one table. Internal node i sends a row left when ``x[feature[i]] <op> threshold[i]``
    (``op`` is ``<=`` or ``<``, per framework) and NaN to ``left`` when ``default_left[i]``; a leaf has
    ``left[i] == -1`` and adds ``value[i]`` to output ``tree_output[t]`` of its tree. ``base`` is added once.
    One output means a binary task (logit of class 1); otherwise one output per class (softmax)."""

    feature: np.ndarray  # (N,) int
    threshold: np.ndarray  # (N,) float64
    left: np.ndarray  # (N,) int, -1 at leaves
    right: np.ndarray  # (N,) int
    default_left: np.ndarray  # (N,) bool
    value: np.ndarray  # (N,) float64, leaf values
    roots: np.ndarray  # (T,) int
    tree_output: np.ndarray  # (T,) int
    base: np.ndarray  # (n_outputs,) float64
    n_features: int
    op: Literal["<=", "<"] = "<="
    framework: str = ""
    float64: bool = (
        True  # compare in float64 (scikit-learn, LightGBM) or float32 (XGBoost, CatBoost), as they do
    )

    def __post_init__(self) -> None:
        self.depth = self._depth()

    @property
    def n_outputs(self) -> int:
        return len(self.base)

    @property
    def n_classes(self) -> int:
        return 2 if self.n_outputs == 1 else self.n_outputs

    def _depth(self) -> int:
        depth, level = 0, self.roots
        while len(level):
            internal = level[self.left[level] >= 0]
            if not len(internal):
                break
            depth += 1
            level = np.concatenate([self.left[internal], self.right[internal]])
        return depth

    def raw(self, x: np.ndarray) -> np.ndarray:
        """(n, n_features) → (n, n_outputs) raw scores (margins), float64."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InputError(
                f"tree ensemble expects features of shape (n, {self.n_features}), got {x.shape}; compute them "
                "with roadwork.data.features.images_features."
            )
        n = len(x)
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n)[:, None]
        # the framework's own precision: a threshold between two float32 values must split them as it does
        if self.float64:
            x, thr = x.astype(np.float64), self.threshold
        else:
            thr = self.threshold.astype(np.float32)
        for _ in range(self.depth):
            f = self.feature[node]
            xv = x[rows, f]
            go_left = xv <= thr[node] if self.op == "<=" else xv < thr[node]
            go_left = np.where(np.isnan(xv), self.default_left[node], go_left)
            nxt = np.where(go_left, self.left[node], self.right[node])
            node = np.where(self.left[node] < 0, node, nxt)
        vals = self.value[node]  # (n, T)
        out = np.tile(self.base, (n, 1))
        for k in range(self.n_outputs):
            out[:, k] += vals[:, self.tree_output == k].sum(axis=1)
        return out

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, n_features) → (n, n_classes) logits (a binary margin m becomes [0, m])."""
        return margins_to_logits(self.raw(x))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "framework": self.framework,
            "op": self.op,
            "float64": self.float64,
            "n_features": self.n_features,
            "base": self.base.tolist(),
            "roots": self.roots.tolist(),
            "tree_output": self.tree_output.tolist(),
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "default_left": self.default_left.astype(int).tolist(),
            "value": self.value.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TreeEnsemble:
        if d.get("schema") != 1:
            raise ArtifactError(f"tree ensemble schema {d.get('schema')!r} is not 1; re-export the bundle.")
        return cls(
            feature=np.asarray(d["feature"], np.intp),
            threshold=np.asarray(d["threshold"], np.float64),
            left=np.asarray(d["left"], np.intp),
            right=np.asarray(d["right"], np.intp),
            default_left=np.asarray(d["default_left"], bool),
            value=np.asarray(d["value"], np.float64),
            roots=np.asarray(d["roots"], np.intp),
            tree_output=np.asarray(d["tree_output"], np.intp),
            base=np.asarray(d["base"], np.float64),
            n_features=int(d["n_features"]),
            op=d["op"],
            framework=str(d.get("framework", "")),
            float64=bool(d.get("float64", True)),
        )


class NodeTable:
    """Builder: frameworks' converters append trees node by node."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {
            k: [] for k in ("feature", "threshold", "left", "right", "default_left", "value")
        }
        self.roots: list[int] = []
        self.tree_output: list[int] = []

    def add(
        self,
        feature: int = 0,
        threshold: float = 0.0,
        default_left: bool = True,
        value: float = 0.0,
    ) -> int:
        """Append a node (children linked later with :meth:`link`); returns its index."""
        i = len(self.cols["feature"])
        for k, v in (
            ("feature", feature),
            ("threshold", threshold),
            ("left", -1),
            ("right", -1),
            ("default_left", default_left),
            ("value", value),
        ):
            self.cols[k].append(v)
        return i

    def link(self, node: int, left: int, right: int) -> None:
        self.cols["left"][node] = left
        self.cols["right"][node] = right

    def start_tree(self, output: int) -> None:
        self.roots.append(len(self.cols["feature"]))
        self.tree_output.append(output)

    def build(
        self, *, n_outputs: int, n_features: int, op: Literal["<=", "<"], framework: str, float64: bool
    ) -> TreeEnsemble:
        c = self.cols
        return TreeEnsemble(
            feature=np.asarray(c["feature"], np.intp),
            threshold=np.asarray(c["threshold"], np.float64),
            left=np.asarray(c["left"], np.intp),
            right=np.asarray(c["right"], np.intp),
            default_left=np.asarray(c["default_left"], bool),
            value=np.asarray(c["value"], np.float64),
            roots=np.asarray(self.roots, np.intp),
            tree_output=np.asarray(self.tree_output, np.intp),
            base=np.zeros(n_outputs),
            n_features=n_features,
            op=op,
            framework=framework,
            float64=float64,
        )
