"""Gradient boosting behind one adapter: scikit-learn, XGBoost, LightGBM and CatBoost (the ``tabular`` extra).

:func:`fit_booster` trains one with comparable settings (depth-limited trees, learning rate, rounds, seed);
:func:`to_trees` converts it to a :class:`~roadwork.models.trees.TreeEnsemble` — the form roadwork stores,
evaluates and serves — and checks that the conversion reproduces the framework's own raw scores.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roadwork._deps import require
from roadwork.errors import ArtifactError, ConfigError
from roadwork.models.trees import NodeTable, TreeEnsemble

__all__ = ["FRAMEWORKS", "BoostingParams", "available_frameworks", "fit_booster", "native_raw", "to_trees"]

FRAMEWORKS = ("sklearn", "xgboost", "lightgbm", "catboost")
"""The gradient-boosting frameworks a cascade's first stage can use."""
_MODULE = {"sklearn": "sklearn", "xgboost": "xgboost", "lightgbm": "lightgbm", "catboost": "catboost"}


@dataclass(frozen=True)
class BoostingParams:
    """Hyper-parameters shared by every boosting framework (rounds, learning rate, depth ...)."""

    rounds: int = 200
    learning_rate: float = 0.1
    max_depth: int = 6
    seed: int = 0
    threads: int = 0  # 0: the framework's default (all cores)


def available_frameworks() -> dict[str, bool]:
    """Which of :data:`FRAMEWORKS` are installed."""
    import importlib.util

    return {f: importlib.util.find_spec(_MODULE[f]) is not None for f in FRAMEWORKS}


def _check(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ConfigError(f"boosting framework {framework!r} is unknown; use one of {', '.join(FRAMEWORKS)}.")


def fit_booster(framework: str, x: np.ndarray, y: np.ndarray, n_classes: int, params: BoostingParams) -> Any:
    """Train ``framework``'s classifier on features ``x`` and class indices ``y``; returns the native model."""
    _check(framework)
    p = params
    threads = p.threads or None
    if framework == "sklearn":
        ensemble = require("sklearn.ensemble")
        model = ensemble.HistGradientBoostingClassifier(
            max_iter=p.rounds,
            learning_rate=p.learning_rate,
            max_depth=p.max_depth,
            early_stopping=False,
            random_state=p.seed,
        )
    elif framework == "xgboost":
        model = require("xgboost").XGBClassifier(
            n_estimators=p.rounds,
            learning_rate=p.learning_rate,
            max_depth=p.max_depth,
            random_state=p.seed,
            n_jobs=threads,
            tree_method="hist",
        )
    elif framework == "lightgbm":
        model = require("lightgbm").LGBMClassifier(
            n_estimators=p.rounds,
            learning_rate=p.learning_rate,
            max_depth=p.max_depth,
            num_leaves=min(31, 2**p.max_depth),
            random_state=p.seed,
            n_jobs=threads or -1,
            verbose=-1,
        )
    else:
        model = require("catboost").CatBoostClassifier(
            iterations=p.rounds,
            learning_rate=p.learning_rate,
            depth=p.max_depth,
            random_seed=p.seed,
            thread_count=threads or -1,
            verbose=0,
            allow_writing_files=False,
        )
    model.fit(np.asarray(x, np.float32), np.asarray(y))
    classes = getattr(model, "classes_", None)
    if classes is not None and len(classes) != n_classes:
        raise ConfigError(
            f"the training split has {len(classes)} of the {n_classes} classes; every class needs training rows "
            "for the boosting stage."
        )
    return model


def native_raw(framework: str, model: Any, x: np.ndarray) -> np.ndarray:
    """The framework's own raw scores (margins), shape (n, 1) for binary tasks or (n, K)."""
    x = np.asarray(x, np.float32)
    if framework == "sklearn":
        r = model.decision_function(x)
    elif framework == "xgboost":
        r = model.predict(x, output_margin=True)
    elif framework == "lightgbm":
        r = model.predict(x, raw_score=True)
    else:
        r = model.predict(x, prediction_type="RawFormulaVal")
    r = np.asarray(r, np.float64)
    return r.reshape(len(x), -1)


def _sklearn(model: Any, t: NodeTable) -> None:
    for per_iteration in model._predictors:
        for k, predictor in enumerate(per_iteration):
            nodes = predictor.nodes
            t.start_tree(k)
            offset = len(t.cols["feature"])
            for nd in nodes:
                t.add(
                    int(nd["feature_idx"]),
                    float(nd["num_threshold"]),
                    bool(nd["missing_go_to_left"]),
                    float(nd["value"]),
                )
            for i, nd in enumerate(nodes):
                if not nd["is_leaf"]:
                    t.link(offset + i, offset + int(nd["left"]), offset + int(nd["right"]))


def _xgboost(model: Any, t: NodeTable, n_outputs: int) -> None:
    def walk(nd: dict[str, Any]) -> int:
        if "leaf" in nd:
            return t.add(value=float(nd["leaf"]))
        i = t.add(int(str(nd["split"]).lstrip("f")), float(nd["split_condition"]), nd["missing"] == nd["yes"])
        kids = {c["nodeid"]: c for c in nd["children"]}
        left, right = walk(kids[nd["yes"]]), walk(kids[nd["no"]])
        t.link(i, left, right)
        return i

    for j, text in enumerate(model.get_booster().get_dump(dump_format="json")):
        t.start_tree(j % n_outputs)
        walk(json.loads(text))


def _lightgbm(model: Any, t: NodeTable, n_outputs: int) -> None:
    def walk(nd: dict[str, Any]) -> int:
        if "leaf_value" in nd:
            return t.add(value=float(nd["leaf_value"]))
        if nd.get("decision_type", "<=") != "<=":
            raise ArtifactError(
                f"LightGBM split type {nd['decision_type']!r} is not supported (numeric only)."
            )
        i = t.add(int(nd["split_feature"]), float(nd["threshold"]), bool(nd.get("default_left", True)))
        left, right = walk(nd["left_child"]), walk(nd["right_child"])
        t.link(i, left, right)
        return i

    for j, info in enumerate(model.booster_.dump_model()["tree_info"]):
        t.start_tree(j % n_outputs)
        walk(info["tree_structure"])


def _catboost(model: Any, t: NodeTable, n_outputs: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.json"
        model.save_model(str(path), format="json")
        spec = json.loads(path.read_text())
    scale = float(spec.get("scale_and_bias", [1.0, [0.0]])[0])
    for tree in spec["oblivious_trees"]:
        splits = tree["splits"]
        leaves = np.asarray(tree["leaf_values"], np.float64).reshape(-1, n_outputs) * scale
        for k in range(n_outputs):
            t.start_tree(k)
            _oblivious(t, splits, leaves[:, k], 0, 0)


def _oblivious(t: NodeTable, splits: list[dict[str, Any]], leaves: np.ndarray, level: int, index: int) -> int:
    """Expand a CatBoost symmetric tree: leaf index bit ``level`` is set when split ``level`` went right
    (x > border)."""
    if level == len(splits):
        return t.add(value=float(leaves[index]))
    s = splits[level]
    if s.get("split_type", "FloatFeature") != "FloatFeature":
        raise ArtifactError(f"CatBoost split type {s.get('split_type')!r} is not supported.")
    i = t.add(int(s["float_feature_index"]), float(s["border"]), True)
    left = _oblivious(t, splits, leaves, level + 1, index)
    right = _oblivious(t, splits, leaves, level + 1, index | (1 << level))
    t.link(i, left, right)
    return i


def to_trees(framework: str, model: Any, x_check: np.ndarray) -> TreeEnsemble:
    """Convert to a :class:`TreeEnsemble`; ``x_check`` (a few feature rows) verifies the conversion against the
    framework's raw scores and fixes the constant term (base score / prior), which frameworks store differently."""
    _check(framework)
    x_check = np.asarray(x_check, np.float32)
    ref = native_raw(framework, model, x_check)
    n_outputs, n_features = ref.shape[1], x_check.shape[1]
    t = NodeTable()
    if framework == "sklearn":
        _sklearn(model, t)
        op = "<="
    elif framework == "xgboost":
        _xgboost(model, t, n_outputs)
        op = "<"
    elif framework == "lightgbm":
        _lightgbm(model, t, n_outputs)
        op = "<="
    else:
        _catboost(model, t, n_outputs)
        op = "<="
    trees = t.build(
        n_outputs=n_outputs,
        n_features=n_features,
        op=op,  # type: ignore[arg-type]
        framework=framework,
        float64=framework in ("sklearn", "lightgbm"),
    )
    resid = ref - trees.raw(x_check)
    trees.base = resid.mean(axis=0)
    err = float(np.abs(resid - trees.base).max()) if len(resid) else 0.0
    if err > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise ArtifactError(
            f"converting the {framework} model to roadwork's tree table changed its raw scores by up to {err:.2e}; "
            "this framework version stores trees differently. Try another cascade.boosting framework and report this."
        )
    return trees
