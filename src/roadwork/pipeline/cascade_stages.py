"""The cascade's two pipeline stages (see :mod:`roadwork.trust.cascade` for the method).

- ``cascade_models``: train the cheap stages (gradient boosting on image features, a small network, with
  Gatekeeper fine-tuning or a learned deferral gate), store their outputs on the calibration and test splits,
  and measure every stage's ms/image — the expensive part, independent of the trust settings;
- ``cascade``: calibrate each earlier stage and certify the gate (and which stages to keep) — seconds, rerun
  whenever the policy or the cascade's target changes.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork.errors import ConfigError, RoadworkWarning
from roadwork.jsonio import write_json
from roadwork.pipeline.runner import StageContext
from roadwork.pipeline.stages import (
    _abs_paths,
    _labels,
    _preds,
    decode_side_for,
    load_calibrator,
    load_dataset,
)
from roadwork.trust import Predictions, make_calibrator
from roadwork.trust.calibration import calibrate_proba

__all__ = ["stage_cascade", "stage_cascade_models", "stage_outputs"]


def _run_side(ctx: StageContext) -> int:
    """The run's decode side (see :func:`roadwork.pipeline.stages.decode_side_for`) from the trained model's card."""
    from roadwork.models.factory import ModelCard

    return decode_side_for(ctx.cfg, ModelCard.load(ctx.inputs["train"] / "model.json").preprocess)


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
        _abs_paths(tr, ctx.inputs["data"]),
        card.preprocess,
        "deferral: model on train",
        ctx.progress,
        min_side=decode_side_for(ctx.cfg, card.preprocess),
    )
    slice_cols = [c for c in tr.columns if c not in ("id", "path", "label", "split", "sha256")]
    p_tr = calibrate_proba(
        calibrator,
        predict_logits(model, u8, card.preprocess),
        {c: tr[c].to_numpy() for c in slice_cols},
    )
    val = _preds(ctx, "val")
    p_val = calibrate_proba(calibrator, val.logits, val.slices)
    y_tr = _labels(tr, classes)
    return Deferral(
        p_large_train=p_tr[np.arange(len(y_tr)), y_tr],
        p_large_val=p_val[np.arange(len(val)), val.labels],
        cost=ctx.cfg.cascade.small.deferral_cost,  # type: ignore[union-attr]
    )


def _gatekeeper(
    ctx: StageContext, res: Any, mcfg: Any, tcfg: Any, parts: dict[str, pd.DataFrame], classes: list[str]
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune the small stage with the Gatekeeper loss (from its trained weights, lr / 10) and measure its
    deferral quality before and after on the calibration split: AUROC of confidence for "this answer is right"
    and the area under the risk–coverage curve (lower is better)."""
    from roadwork.training.loop import load_uint8, predict_logits, train_model
    from roadwork.trust import metrics as M
    from roadwork.trust._checks import softmax

    c = ctx.cfg.cascade
    assert c.small is not None
    data_dir = ctx.inputs["data"]
    u8 = load_uint8(
        _abs_paths(parts["calib"], data_dir),
        res.card.preprocess,
        "gatekeeper: calib",
        ctx.progress,
        min_side=_run_side(ctx),
    )
    y = _labels(parts["calib"], classes)

    def quality(model: Any) -> dict[str, float]:
        z = predict_logits(model, u8, res.card.preprocess)
        conf, correct = softmax(z).max(1), z.argmax(1) == y
        return {
            "accuracy": float(correct.mean()),
            "auroc": M._binary_auroc(conf, correct),  # nan when every answer is right (or wrong)
            "aurc": M.aurc(conf, correct),
        }

    before = quality(res.model)
    tuned = train_model(
        mcfg,
        tcfg.model_copy(
            update={
                "epochs": c.small.gatekeeper_epochs,
                "loss": "gatekeeper",
                "gatekeeper_alpha": c.small.gatekeeper_alpha,
                "lr": tcfg.lr / 10,
                "warmup_epochs": 0,
                "patience": c.small.gatekeeper_epochs,
            }
        ),
        classes=classes,
        train_paths=_abs_paths(parts["train"], data_dir),
        train_labels=_labels(parts["train"], classes),
        val_paths=_abs_paths(parts["val"], data_dir),
        val_labels=_labels(parts["val"], classes),
        progress=ctx.progress,
        init_weights=ctx.out / "small" / "model.safetensors",
    )
    after = quality(tuned.model)
    return tuned, {"gatekeeper": {"alpha": c.small.gatekeeper_alpha, "before": before, "after": after}}


def stage_outputs(cascade_dir: Path, stage: Any, split: str) -> np.ndarray:
    """A cascade stage's stored outputs on a split as its model emits them: class logits, plus the gate logit
    as a last column for a learned gate."""
    z = Predictions.from_parquet(cascade_dir / f"predictions-{split}-{stage.name}.parquet").logits
    if stage.info.get("gate"):
        g = pd.read_parquet(cascade_dir / f"gate-{split}-{stage.name}.parquet")["gate_logit"].to_numpy()
        z = np.concatenate([z, g[:, None]], axis=1)
    return z


def stage_cascade_models(ctx: StageContext) -> dict[str, Any]:
    """Train the cheap stages (gradient boosting on image features, a small network), store their outputs on
    the calibration and test splits, and measure every stage's ms/image (the model's included)."""
    import dataclasses

    from roadwork.data.features import images_features
    from roadwork.export.cascade import StageRunner, count_flops, measure_cost_ms
    from roadwork.trust.cascade import CascadeStage

    c = ctx.cfg.cascade
    if not c.enabled:
        write_json(ctx.out / "stages.json", {"enabled": False})
        return {"enabled": False}
    if c.boosting == "none" and c.small is None:
        raise ConfigError(
            "cascade.enabled=true needs an earlier stage: set cascade.boosting (e.g. sklearn) or cascade.small."
        )
    df, classes = load_dataset(ctx.inputs["data"])
    data_dir = ctx.inputs["data"]
    parts = {split: df[df["split"] == split] for split in ("train", "val", "calib", "test")}
    side = _run_side(ctx)
    images = {
        split: _load_images(_abs_paths(part, data_dir), f"cascade: reading {split}", ctx.progress, side)
        for split, part in parts.items()
        if split in ("calib", "test")
    }
    cost_images = images["test"][: c.cost_images]
    stages: list[CascadeStage] = []
    runners: list[StageRunner] = []
    logits: dict[str, list[np.ndarray]] = {"calib": [], "test": []}  # class logits of every stage
    gates: dict[str, dict[int, np.ndarray | None]] = {"calib": {}, "test": {}}  # learned gate logits

    if c.boosting != "none":
        from roadwork.models.boosting import BoostingParams, fit_booster, to_trees

        feats = {
            split: images_features(
                images[split]
                if split in images
                else _load_images(
                    _abs_paths(parts[split], data_dir), f"cascade: reading {split}", ctx.progress, side
                )
            )
            for split in ("train", "calib", "test")
        }
        t0 = time.perf_counter()
        params = BoostingParams(rounds=c.boosting_rounds, max_depth=c.boosting_depth, seed=ctx.cfg.train.seed)
        booster = fit_booster(
            c.boosting, feats["train"], _labels(parts["train"], classes), len(classes), params
        )
        fit_s = time.perf_counter() - t0
        trees = to_trees(c.boosting, booster, feats["calib"][:256])
        (ctx.out / "stage0-trees.json").write_text(json.dumps(trees.to_dict()))
        runners.append(StageRunner("boosting", trees=trees))
        for split in logits:
            logits[split].append(trees.logits(feats[split]))
        stages.append(
            CascadeStage(
                f"boost-{c.boosting}",
                "boosting",
                "stage0-trees.json",
                0.0,
                info={"framework": c.boosting, "trees": len(trees.roots), "fit_seconds": round(fit_s, 3)},
            )
        )

    if c.small is not None:
        from roadwork.export.onnx import export_onnx
        from roadwork.models.factory import save_model
        from roadwork.training.loop import train_model

        mcfg = ctx.cfg.model.model_copy(
            update={
                "backbone": c.small.backbone,
                "kwargs": c.small.kwargs,
                "image_size": c.small.image_size,
                "weights": None,
            }
        )
        tcfg = ctx.cfg.train.model_copy(update={"epochs": c.small.epochs or ctx.cfg.train.epochs})
        tr, va = parts["train"], parts["val"]
        learned = c.small.deferral == "learned"
        if learned and c.small.gatekeeper_epochs:
            raise ConfigError(
                "cascade.small.deferral=learned trains its own gate; it does not combine with "
                "cascade.small.gatekeeper_epochs. Set one of them (gatekeeper_epochs=0 or deferral=confidence)."
            )
        res = train_model(
            mcfg,
            tcfg,
            classes=classes,
            train_paths=_abs_paths(tr, data_dir),
            train_labels=_labels(tr, classes),
            val_paths=_abs_paths(va, data_dir),
            val_labels=_labels(va, classes),
            progress=ctx.progress,
            deferral=_deferral_targets(ctx, parts, classes) if learned else None,
        )
        idx = len(stages)
        (ctx.out / "small").mkdir()
        save_model(res.model, res.card, ctx.out / "small")
        deferral: dict[str, Any] = {}
        if c.small.gatekeeper_epochs:
            res, deferral = _gatekeeper(ctx, res, mcfg, tcfg, parts, classes)
            save_model(res.model, res.card, ctx.out / "small")
        (ctx.out / f"stage{idx}-model.json").write_text(json.dumps(res.card.to_dict(), indent=2))
        from roadwork.data.preprocess import preprocess

        sample = preprocess(images["test"][:8], res.card.preprocess)
        export_onnx(
            res.model,
            sample,
            ctx.out / f"stage{idx}-model.onnx",
            opset=ctx.cfg.export.opset,
            exporter=ctx.cfg.export.exporter,
        )
        runner = StageRunner.network(ctx.out / f"stage{idx}-model.onnx", res.card.preprocess, spin=False)
        runners.append(runner)
        for split in logits:
            z = runner.logits(images[split])
            logits[split].append(z[:, : len(classes)])
            gates[split][len(stages)] = z[:, len(classes)] if learned else None
        stages.append(
            CascadeStage(
                "small",
                "network",
                f"stage{idx}-model.onnx",
                0.0,
                flops=count_flops(res.model, res.card.preprocess.size),
                info={
                    "backbone": c.small.backbone,
                    "image_size": c.small.image_size,
                    "card": f"stage{idx}-model.json",
                    "val_accuracy": res.history[-1].get("val_accuracy"),
                    "gate": learned,
                    **({"deferral_cost": c.small.deferral_cost} if learned else {}),
                    **deferral,
                },
            )
        )

    # the last stage: the model, from the predict stage's logits; timed through its own ONNX export
    from roadwork.export.onnx import export_onnx
    from roadwork.models.factory import load_model

    model, card = load_model(ctx.inputs["train"])
    from roadwork.data.preprocess import preprocess

    tmp_onnx = ctx.out / "model.onnx.tmp"
    export_onnx(
        model,
        preprocess(images["test"][:8], card.preprocess),
        tmp_onnx,
        opset=ctx.cfg.export.opset,
        exporter=ctx.cfg.export.exporter,
    )
    runners.append(StageRunner.network(tmp_onnx, card.preprocess, spin=False))  # as the bundle runs them
    for split in logits:
        logits[split].append(_preds(ctx, split).logits)
    stages.append(
        CascadeStage(
            "model",
            "network",
            "model.onnx",
            0.0,
            flops=count_flops(model, card.preprocess.size),
            info={"backbone": ctx.cfg.model.backbone, "image_size": ctx.cfg.model.image_size},
        )
    )
    costs = [measure_cost_ms(r, cost_images, batch=c.cost_batch) for r in runners]
    tmp_onnx.unlink()
    stages = [dataclasses.replace(st, cost_ms=round(ms, 5)) for st, ms in zip(stages, costs, strict=True)]

    for split in logits:  # every early stage's outputs, in the project's one currency
        p = _preds(ctx, split)
        for s_i, (st, z) in enumerate(zip(stages[:-1], logits[split], strict=False)):
            Predictions(p.ids, p.labels, z, p.classes, p.slices).to_parquet(
                ctx.out / f"predictions-{split}-{st.name}.parquet"
            )
            if gates[split].get(s_i) is not None:
                pd.DataFrame({"id": p.ids, "gate_logit": gates[split][s_i]}).to_parquet(
                    ctx.out / f"gate-{split}-{st.name}.parquet", index=False
                )
    (ctx.out / "stages.json").write_text(
        json.dumps({"enabled": True, "stages": [st.to_dict() for st in stages]}, indent=2)
    )
    return {"stages": [s.name for s in stages], "cost_ms": costs}


def stage_cascade(ctx: StageContext) -> dict[str, Any]:
    """Calibrate every earlier stage on the calibrator rows and certify the gate (and which stages to keep) on
    the gate rows of the calibration split (see :mod:`roadwork.pipeline.certify`; the policy's thresholds are
    then fitted on the other rows, on this cascade's outputs)."""
    from roadwork.pipeline.certify import certify_gate, fit_fraction, row_split
    from roadwork.trust.cascade import CascadeStage, cascade_curve, gate_grid

    c = ctx.cfg.cascade
    models = ctx.inputs["cascade_models"]
    listed = json.loads((models / "stages.json").read_text())
    if not listed.get("enabled"):
        write_json(ctx.out / "cascade.json", {"enabled": False})
        return {"enabled": False}
    stages = [CascadeStage.from_dict(d) for d in listed["stages"]]
    costs = [st.cost_ms for st in stages]
    cal, test = _preds(ctx, "calib"), _preds(ctx, "test")
    classes = cal.classes
    logits: dict[str, list[np.ndarray]] = {"calib": [], "test": []}
    gates: dict[str, dict[int, np.ndarray | None]] = {"calib": {}, "test": {}}
    for split_name in logits:
        for s_i, st in enumerate(stages[:-1]):
            z = stage_outputs(models, st, split_name)
            logits[split_name].append(z[:, : len(classes)])
            gates[split_name][s_i] = z[:, len(classes)] if st.info.get("gate") else None

    split = row_split(cal.ids, fit_fraction(ctx.cfg), c.gate_fraction)
    if (
        split.gate.sum() < 20 or split.policy.sum() < 20
    ):  # too few rows to certify both: serve the model alone
        note = (
            f"The cascade is off: cascade.gate_fraction={c.gate_fraction:g} leaves {int(split.gate.sum())} calibration "
            f"rows to certify its gate and {int(split.policy.sum())} for the policy; each needs at least 20. The "
            "model alone is served. Add labelled images (or a larger data.splits.calib) for a cascade."
        )
        write_json(ctx.out / "cascade.json", {"enabled": False, "warnings": [note]})
        return {"enabled": False, "warnings": [note]}
    method = ctx.cfg.calibrate.method
    for s in range(len(stages) - 1):
        stages[s].calibrator = make_calibrator(method).fit(
            logits["calib"][s][split.calibrator], cal.labels[split.calibrator]
        )
    calibrator = load_calibrator(ctx.inputs["calibrate"])

    def stage_probs(split_name: str, p: Predictions, rows: np.ndarray) -> list[np.ndarray]:
        out = [
            st.calibrator.predict_proba(z[rows])  # type: ignore[union-attr]
            for st, z in zip(stages[:-1], logits[split_name], strict=True)
        ]
        sub = p.subset(rows)
        return [*out, calibrate_proba(calibrator, sub.logits, sub.slices)]

    def stage_scores(split_name: str, rows: np.ndarray) -> list[np.ndarray | None]:
        g = gates[split_name]
        return [None if g.get(s) is None else 1 / (1 + np.exp(-g[s][rows])) for s in range(len(stages))]  # type: ignore[index]

    gate_probs = stage_probs("calib", cal, split.gate)
    scores = stage_scores("calib", split.gate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoadworkWarning)
        cascade, candidates = certify_gate(c, stages, gate_probs, scores, cal.labels[split.gate])
    notes = [str(w.message) for w in caught]
    if len(cascade.stages) < 2:
        notes.append(
            "No earlier cascade stage pays for itself at the certified gate: every image goes to the model "
            f"(certified on {int(split.gate.sum())} gate rows at {c.mode} ≤ {c.target:g}). Raise cascade.target or "
            "add calibration images for a cheaper cascade."
        )
    spec = {
        "enabled": True,
        **cascade.to_dict(),
        "candidates": candidates,
        "all_stages": [st.to_dict() for st in stages],
        "rows": split.counts(),
        "warnings": notes,
    }
    write_json(ctx.out / "cascade.json", spec)
    grid = gate_grid(1 / len(classes))  # the whole frontier for the report; the certified gate stays ≥ 0.5
    every = np.ones(len(test), bool)
    curves = {
        "calib": cascade_curve(gate_probs, cal.labels[split.gate], costs, grid, c.mode, scores),
        "test": cascade_curve(
            stage_probs("test", test, every), test.labels, costs, grid, c.mode, stage_scores("test", every)
        ),
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
