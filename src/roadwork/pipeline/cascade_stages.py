"""The cascade's two pipeline stages (see :mod:`roadwork.trust.cascade` for the method).

- ``cascade_models``: train the cheap stages (gradient boosting on image features, a small network, with
  Gatekeeper fine-tuning or a learned deferral gate), store their outputs on the calibration and test splits,
  and measure every stage's ms/image — the expensive part, independent of the trust settings;
- ``cascade``: calibrate each earlier stage and certify the gate (and which stages to keep) — seconds, rerun
  whenever the policy or the cascade's target changes.

The files they read and write are in :mod:`roadwork.pipeline.artifacts`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork.config import RunConfig
from roadwork.errors import RoadworkWarning
from roadwork.jsonio import write_json
from roadwork.pipeline.artifacts import (
    abs_paths,
    decode_side_for,
    label_indices,
    load_calibrator,
    load_dataset,
    load_predictions,
    read_json,
    run_decode_side,
    slice_columns,
    split_rows,
    stage_outputs,
    write_stage_outputs,
)
from roadwork.pipeline.runner import StageContext
from roadwork.trust import Predictions, make_calibrator, softmax
from roadwork.trust.calibration import calibrate_proba
from roadwork.trust.cascade import CascadeStage

__all__ = ["cascade_auto_key", "stage_cascade", "stage_cascade_models"]

_OUTPUT_SPLITS = ("calib", "test")  # the splits every stage's outputs are stored on


@dataclass
class _Built:
    """One trained cascade stage: its description, what times it, and its outputs on the stored splits (class
    logits; a learned gate's logit, or None)."""

    stage: CascadeStage
    runner: Any  # roadwork.export.cascade.StageRunner
    logits: dict[str, np.ndarray]
    gates: dict[str, np.ndarray | None] = field(default_factory=dict)


def _load_images(paths: list[str], what: str, progress: bool, side: int) -> list[Any]:
    """Decoded images for every cascade stage, at the run's decode side (as the bundle decodes them)."""
    from roadwork._progress import progress_bar
    from roadwork.data.preprocess import load_rgb

    return [
        load_rgb(p, side)
        for p in progress_bar(paths, desc=what, unit="img", leave=False, disable=not progress)
    ]


def _deferral_targets(ctx: StageContext, parts: dict[str, pd.DataFrame], classes: list[str]) -> Any:
    """The large model's calibrated probability of the true class on train and val images: what a learned
    deferral gate weighs the small model against."""
    from roadwork.models.factory import load_model
    from roadwork.training.loop import Deferral, load_uint8, predict_logits

    calibrator = load_calibrator(ctx.inputs["calibrate"])
    model, card = load_model(ctx.inputs["train"])
    tr = parts["train"]
    u8 = load_uint8(
        abs_paths(tr, ctx.inputs["data"]),
        card.preprocess,
        "deferral: model on train",
        ctx.progress,
        min_side=decode_side_for(ctx.cfg, card.preprocess),
    )
    p_tr = calibrate_proba(calibrator, predict_logits(model, u8, card.preprocess), slice_columns(tr))
    val = load_predictions(ctx.inputs["predict"], "val")
    p_val = calibrate_proba(calibrator, val.logits, val.slices)
    y_tr = label_indices(tr, classes)
    return Deferral(
        p_large_train=p_tr[np.arange(len(y_tr)), y_tr],
        p_large_val=p_val[np.arange(len(val)), val.labels],
        cost=ctx.cfg.cascade.small.deferral_cost,  # type: ignore[union-attr]
    )


def _train_kwargs(ctx: StageContext, parts: dict[str, pd.DataFrame], classes: list[str]) -> dict[str, Any]:
    """The images and labels :func:`roadwork.training.loop.train_model` trains a cascade network on."""
    data_dir = ctx.inputs["data"]
    return {
        "classes": classes,
        "train_paths": abs_paths(parts["train"], data_dir),
        "train_labels": label_indices(parts["train"], classes),
        "val_paths": abs_paths(parts["val"], data_dir),
        "val_labels": label_indices(parts["val"], classes),
        "progress": ctx.progress,
    }


def _gatekeeper(
    ctx: StageContext, res: Any, mcfg: Any, tcfg: Any, parts: dict[str, pd.DataFrame], classes: list[str]
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the small stage with the Gatekeeper loss (from its trained weights, lr / 10) and measure its
    deferral quality before and after on the calibration split: AUROC of confidence for "this answer is right"
    and the area under the risk–coverage curve (lower is better)."""
    from roadwork.training.loop import load_uint8, predict_logits, train_model
    from roadwork.trust import metrics as M

    c = ctx.cfg.cascade
    assert c.small is not None
    u8 = load_uint8(
        abs_paths(parts["calib"], ctx.inputs["data"]),
        res.card.preprocess,
        "gatekeeper: calib",
        ctx.progress,
        min_side=run_decode_side(ctx.cfg, ctx.inputs["train"]),
    )
    y = label_indices(parts["calib"], classes)

    def quality(model: Any) -> dict[str, float]:
        z = predict_logits(model, u8, res.card.preprocess)
        conf, correct = softmax(z).max(1), z.argmax(1) == y
        return {
            "accuracy": float(correct.mean()),
            "auroc": M.binary_auroc(conf, correct),  # nan when every answer is right (or wrong)
            "aurc": M.aurc(conf, correct),
        }

    before = quality(res.model)
    epochs = c.small.gatekeeper_epochs
    update = {"epochs": epochs, "loss": "gatekeeper", "gatekeeper_alpha": c.small.gatekeeper_alpha}
    update |= {"lr": tcfg.lr / 10, "warmup_epochs": 0, "patience": epochs}
    tuned = train_model(
        mcfg,
        tcfg.model_copy(update=update),
        **_train_kwargs(ctx, parts, classes),
        init_weights=ctx.out / "small" / "model.safetensors",
    )
    after = quality(tuned.model)
    return tuned, {"gatekeeper": {"alpha": c.small.gatekeeper_alpha, "before": before, "after": after}}


def _boosting_stage(
    ctx: StageContext, parts: dict[str, pd.DataFrame], images: dict[str, list[Any]], classes: list[str]
) -> _Built:
    """Gradient boosting on cheap image features of the train split; its trees stored as stage0-trees.json."""
    from roadwork.data.features import images_features
    from roadwork.export.cascade import StageRunner
    from roadwork.models.boosting import BoostingParams, fit_booster, to_trees

    c = ctx.cfg.cascade
    side = run_decode_side(ctx.cfg, ctx.inputs["train"])
    train_images = _load_images(
        abs_paths(parts["train"], ctx.inputs["data"]), "cascade: reading train", ctx.progress, side
    )
    feats = {split: images_features(imgs) for split, imgs in {"train": train_images, **images}.items()}
    t0 = time.perf_counter()
    params = BoostingParams(rounds=c.boosting_rounds, max_depth=c.boosting_depth, seed=ctx.cfg.train.seed)
    booster = fit_booster(
        c.boosting, feats["train"], label_indices(parts["train"], classes), len(classes), params
    )
    fit_s = time.perf_counter() - t0
    trees = to_trees(c.boosting, booster, feats["calib"][:256])
    write_json(ctx.out / "stage0-trees.json", trees.to_dict(), indent=None)
    info = {"framework": c.boosting, "trees": len(trees.roots), "fit_seconds": round(fit_s, 3)}
    return _Built(
        CascadeStage(f"boost-{c.boosting}", "boosting", "stage0-trees.json", 0.0, info=info),
        StageRunner("boosting", trees=trees),
        {split: trees.logits(feats[split]) for split in _OUTPUT_SPLITS},
    )


def _export_network(ctx: StageContext, model: Any, card: Any, images: list[Any], path: Path) -> Any:
    """Export ``model`` to ONNX at ``path`` (traced on a few test images) and return its timed runner."""
    from roadwork.data.preprocess import preprocess
    from roadwork.export.cascade import StageRunner
    from roadwork.export.onnx import export_onnx

    e = ctx.cfg.export
    export_onnx(model, preprocess(images[:8], card.preprocess), path, opset=e.opset, exporter=e.exporter)
    return StageRunner.network(path, card.preprocess, spin=False)  # as the bundle runs it


def _small_stage(
    ctx: StageContext,
    parts: dict[str, pd.DataFrame],
    images: dict[str, list[Any]],
    classes: list[str],
    idx: int,
) -> _Built:
    """The small network, trained by the model's loop (then Gatekeeper-tuned, or with a learned gate)."""
    from roadwork.export.cascade import count_flops
    from roadwork.models.factory import save_model
    from roadwork.training.loop import train_model

    small = ctx.cfg.cascade.small
    assert small is not None
    update = {
        "backbone": small.backbone,
        "kwargs": small.kwargs,
        "image_size": small.image_size,
        "weights": None,
    }
    mcfg = ctx.cfg.model.model_copy(update=update)
    tcfg = ctx.cfg.train.model_copy(update={"epochs": small.epochs or ctx.cfg.train.epochs})
    learned = small.deferral == "learned"  # load_config refuses it together with gatekeeper_epochs
    deferral = _deferral_targets(ctx, parts, classes) if learned else None
    res = train_model(mcfg, tcfg, **_train_kwargs(ctx, parts, classes), deferral=deferral)
    (ctx.out / "small").mkdir()
    save_model(res.model, res.card, ctx.out / "small")
    tuning: dict[str, Any] = {}
    if small.gatekeeper_epochs:
        res, tuning = _gatekeeper(ctx, res, mcfg, tcfg, parts, classes)
        save_model(res.model, res.card, ctx.out / "small")
    write_json(ctx.out / f"stage{idx}-model.json", res.card.to_dict())
    runner = _export_network(ctx, res.model, res.card, images["test"], ctx.out / f"stage{idx}-model.onnx")
    outputs = {split: runner.logits(images[split]) for split in _OUTPUT_SPLITS}
    k = len(classes)
    info = {"backbone": small.backbone, "image_size": small.image_size, "card": f"stage{idx}-model.json"}
    info |= {"val_accuracy": res.history[-1].get("val_accuracy"), "gate": learned}
    info |= ({"deferral_cost": small.deferral_cost} if learned else {}) | tuning
    return _Built(
        CascadeStage(
            "small",
            "network",
            f"stage{idx}-model.onnx",
            0.0,
            flops=count_flops(res.model, res.card.preprocess.size),
            info=info,
        ),
        runner,
        {split: z[:, :k] for split, z in outputs.items()},
        {split: z[:, k] if learned else None for split, z in outputs.items()},
    )


def _model_stage(ctx: StageContext, images: dict[str, list[Any]], tmp_onnx: Path) -> _Built:
    """The last stage: the model, from the predict stage's logits; timed through its own ONNX export."""
    from roadwork.export.cascade import count_flops
    from roadwork.models.factory import load_model

    model, card = load_model(ctx.inputs["train"])
    runner = _export_network(ctx, model, card, images["test"], tmp_onnx)
    info = {"backbone": ctx.cfg.model.backbone, "image_size": ctx.cfg.model.image_size}
    return _Built(
        CascadeStage(
            "model", "network", "model.onnx", 0.0, flops=count_flops(model, card.preprocess.size), info=info
        ),
        runner,
        {split: load_predictions(ctx.inputs["predict"], split).logits for split in _OUTPUT_SPLITS},
    )


def stage_cascade_models(ctx: StageContext) -> dict[str, Any]:
    """Train the cheap stages (gradient boosting on image features, a small network), store their outputs on
    the calibration and test splits, and measure every stage's ms/image (the model's included)."""
    from roadwork.export.cascade import measure_cost_ms

    c = ctx.cfg.cascade
    if not c.enabled:
        write_json(ctx.out / "stages.json", {"enabled": False})
        return {"enabled": False}
    df, classes = load_dataset(ctx.inputs["data"])  # load_config ensures an earlier stage exists
    if c.enabled == "auto":  # decided from the data size before any stage trains (its key: cascade_auto_key)
        from roadwork.pipeline.certify import fit_fraction, row_split

        calib_ids = split_rows(df, "calib")["id"].to_numpy()
        cannot = _cannot_pay(ctx, row_split(calib_ids, fit_fraction(ctx.cfg), c.gate_fraction))
        if cannot is not None:
            from roadwork._progress import progress_write

            progress_write(f"[cascade] off (cascade.enabled=auto): {cannot}")
            write_json(ctx.out / "stages.json", {"enabled": False, "reason": cannot})
            return {"enabled": False}
    parts = {split: split_rows(df, split) for split in ("train", "val", "calib", "test")}
    side = run_decode_side(ctx.cfg, ctx.inputs["train"])
    images = {
        split: _load_images(
            abs_paths(parts[split], ctx.inputs["data"]), f"cascade: reading {split}", ctx.progress, side
        )
        for split in _OUTPUT_SPLITS
    }
    built: list[_Built] = []
    if c.boosting != "none":
        built.append(_boosting_stage(ctx, parts, images, classes))
    if c.small is not None:
        built.append(_small_stage(ctx, parts, images, classes, idx=len(built)))
    tmp_onnx = ctx.out / "model.onnx.tmp"
    built.append(_model_stage(ctx, images, tmp_onnx))
    costs = [measure_cost_ms(b.runner, images["test"][: c.cost_images], batch=c.cost_batch) for b in built]
    tmp_onnx.unlink()
    stages = [dataclasses.replace(b.stage, cost_ms=round(ms, 5)) for b, ms in zip(built, costs, strict=True)]
    for split in _OUTPUT_SPLITS:  # every early stage's outputs, in the project's one currency
        p = load_predictions(ctx.inputs["predict"], split)
        for st, b in zip(stages[:-1], built[:-1], strict=True):
            write_stage_outputs(ctx.out, st.name, split, p, b.logits[split], b.gates.get(split))
    write_json(ctx.out / "stages.json", {"enabled": True, "stages": [st.to_dict() for st in stages]})
    return {"stages": [s.name for s in stages], "cost_ms": costs}


# ------------------------------------------------------------------------------------- cascade


@dataclass
class _EarlyOutputs:
    """The earlier stages' stored outputs on one split: class logits and learned-gate logits (or None)."""

    logits: list[np.ndarray]
    gates: list[np.ndarray | None]

    @classmethod
    def read(cls, models_dir: Path, stages: list[CascadeStage], split: str, k: int) -> _EarlyOutputs:
        zs = [stage_outputs(models_dir, st, split) for st in stages[:-1]]
        gates = [z[:, k] if st.info.get("gate") else None for st, z in zip(stages, zs, strict=False)]
        return cls([z[:, :k] for z in zs], gates)

    def probs(
        self, stages: list[CascadeStage], model_probs: np.ndarray, rows: np.ndarray
    ) -> list[np.ndarray]:
        """Every stage's calibrated probabilities on ``rows``, the model's (already calibrated) last."""
        early = [st.calibrator.predict_proba(z[rows]) for st, z in zip(stages[:-1], self.logits, strict=True)]  # type: ignore[union-attr]
        return [*early, model_probs]

    def scores(self, rows: np.ndarray) -> list[np.ndarray | None]:
        """A learned gate's probability of "answer here" on ``rows`` for each stage (None: by confidence)."""
        out: list[np.ndarray | None] = [None if g is None else 1 / (1 + np.exp(-g[rows])) for g in self.gates]
        return [*out, None]


def cascade_auto_key(cfg: RunConfig) -> str:
    """What ``cascade.enabled=auto``'s decision reads besides the data (the cascade_models stage's cache key): a
    new ``cascade.target`` retrains the earlier stages only when it can change that decision."""
    from roadwork.pipeline.certify import fit_fraction
    from roadwork.trust.selective import rows_needed

    c = cfg.cascade
    if c.enabled != "auto":
        return ""
    return f"auto:{rows_needed(c.target, c.delta)}:{c.gate_fraction}:{fit_fraction(cfg)}"


def _cannot_pay(ctx: StageContext, split: Any) -> str | None:
    """With ``cascade.enabled=auto``: why a cascade cannot pay on this calibration split, or None. Its gate is
    certified on its own share of the calibration rows and the policy on the rest: when the gate's rows are fewer
    than ``cascade.target`` needs at ``cascade.delta`` even with no disagreement at all, no earlier stage can ever
    be kept, and the rows it took are missing behind the policy (1,079 photos: 108 gate rows where 0.02 at δ 0.05
    needs 149). Decided in the cascade_models stage before anything trains (:func:`cascade_auto_key` is in its
    cache key) and checked again in the cascade stage, whose key covers every ``cascade`` key."""
    from roadwork.trust.selective import rows_needed

    c = ctx.cfg.cascade
    if c.enabled != "auto":
        return None
    gate, policy = int(split.gate.sum()), int(split.policy.sum())
    need_gate = rows_needed(c.target, c.delta)
    if gate >= need_gate:
        return None
    return (
        f"its gate would be certified on {gate} of the {len(split.gate)} calibration rows (each row drawn for it "
        f"with probability cascade.gate_fraction={c.gate_fraction:g}), fewer than the {need_gate} that "
        f"cascade.target={c.target:g} needs at "
        f"δ={c.delta:g} even with no disagreement, so no earlier stage could be kept; the model alone is served "
        f"and all {policy + gate} rows certify its policy. A cascade can pay from about "
        f"{math.ceil(need_gate / c.gate_fraction)} calibration images (a larger data set or data.splits.calib), "
        "or with a larger cascade.target."
    )


def _too_few_rows(ctx: StageContext, split: Any) -> str | None:
    """Why the cascade is off for this calibration split (too few rows to certify both gate and policy)."""
    if split.gate.sum() >= 20 and split.policy.sum() >= 20:
        return None
    return (
        f"The cascade is off: cascade.gate_fraction={ctx.cfg.cascade.gate_fraction:g} leaves {int(split.gate.sum())} "
        f"calibration rows to certify its gate and {int(split.policy.sum())} for the policy; each needs at least "
        "20. The model alone is served. Add labelled images (or a larger data.splits.calib) for a cascade."
    )


def _certify(
    ctx: StageContext, stages: list[CascadeStage], probs: list[np.ndarray], scores: Any, labels: np.ndarray
) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """Certify the gate on the gate rows; returns the cascade, the candidates and the warnings."""
    from roadwork.pipeline.certify import certify_gate

    c = ctx.cfg.cascade
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoadworkWarning)
        cascade, candidates = certify_gate(c, stages, probs, scores, labels)
    notes = [str(w.message) for w in caught]
    if len(cascade.stages) < 2:
        notes.append(
            "No earlier cascade stage pays for itself at the certified gate: every image goes to the model "
            f"(certified on {len(labels)} gate rows at {c.mode} ≤ {c.target:g}). Raise cascade.target or "
            "add calibration images for a cheaper cascade."
        )
    return cascade, candidates, notes


def stage_cascade(ctx: StageContext) -> dict[str, Any]:
    """Calibrate every earlier stage on the calibrator rows and certify the gate (and which stages to keep) on
    the gate rows of the calibration split (see :mod:`roadwork.pipeline.certify`; the policy's thresholds are
    then fitted on the other rows, on this cascade's outputs)."""
    from roadwork.pipeline.certify import fit_fraction, row_split
    from roadwork.trust.cascade import cascade_curve, gate_grid

    c = ctx.cfg.cascade
    models = ctx.inputs["cascade_models"]
    listed = read_json(models / "stages.json")
    if not listed.get("enabled"):
        notes = (
            [f"The cascade is off (cascade.enabled=auto): {listed['reason']}"] if listed.get("reason") else []
        )
        write_json(ctx.out / "cascade.json", {"enabled": False, "warnings": notes})
        return {"enabled": False, "warnings": notes}
    stages = [CascadeStage.from_dict(d) for d in listed["stages"]]
    cal, test = (load_predictions(ctx.inputs["predict"], s) for s in ("calib", "test"))
    early = {s: _EarlyOutputs.read(models, stages, s, cal.n_classes) for s in ("calib", "test")}
    split = row_split(cal.ids, fit_fraction(ctx.cfg), c.gate_fraction)
    note = _too_few_rows(ctx, split)
    cannot = _cannot_pay(ctx, split)
    if cannot is not None:  # decided from the data size: said in the log and in the report's warnings
        from roadwork._progress import progress_write

        progress_write(f"[cascade] off (cascade.enabled=auto): {cannot}")
        note = f"The cascade is off (cascade.enabled=auto): {cannot}"
    if note is not None:  # too few rows to certify both: serve the model alone
        write_json(ctx.out / "cascade.json", {"enabled": False, "warnings": [note]})
        return {"enabled": False, "warnings": [note]}
    for st, z in zip(stages[:-1], early["calib"].logits, strict=True):
        st.calibrator = make_calibrator(ctx.cfg.calibrate.method).fit(
            z[split.calibrator], cal.labels[split.calibrator]
        )
    calibrator = load_calibrator(ctx.inputs["calibrate"])

    def model_probs(p: Predictions, rows: np.ndarray) -> np.ndarray:
        sub = p.subset(rows)
        return calibrate_proba(calibrator, sub.logits, sub.slices)

    gate_probs = early["calib"].probs(stages, model_probs(cal, split.gate), split.gate)
    scores = early["calib"].scores(split.gate)
    cascade, candidates, notes = _certify(ctx, stages, gate_probs, scores, cal.labels[split.gate])
    spec = {"enabled": True, **cascade.to_dict(), "candidates": candidates}
    spec |= {"all_stages": [st.to_dict() for st in stages], "rows": split.counts(), "warnings": notes}
    write_json(ctx.out / "cascade.json", spec)
    grid = gate_grid(1 / cal.n_classes)  # the whole frontier for the report; the certified gate stays ≥ 0.5
    costs = [st.cost_ms for st in stages]
    every = np.ones(len(test), bool)
    test_probs = early["test"].probs(stages, model_probs(test, every), every)
    curves = {
        "calib": cascade_curve(gate_probs, cal.labels[split.gate], costs, grid, c.mode, scores),
        "test": cascade_curve(test_probs, test.labels, costs, grid, c.mode, early["test"].scores(every)),
    }
    write_json(
        ctx.out / "curves.json", {k: {m: v.tolist() for m, v in cur.items()} for k, cur in curves.items()}
    )
    return {
        "stages": cascade.names,
        "threshold": cascade.threshold,
        "certified": cascade.certified,
        "calib_risk": cascade.calib_risk,
        "warnings": notes,
    }
