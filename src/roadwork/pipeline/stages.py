"""The stage functions of the main job and their graph.

    data → train → predict → calibrate → conformal, selective → policy → cascade → export → evaluate

Each function reads its inputs' folders and writes into ``ctx.out``; see :mod:`roadwork.pipeline.runner`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork.config import RunConfig, dump_config
from roadwork.errors import ConfigError
from roadwork.pipeline.runner import Stage, StageContext
from roadwork.trust import (
    Predictions,
    SplitConformal,
    TrustPolicy,
    certify_abstention,
    make_calibrator,
)
from roadwork.trust.calibration import Calibrator, SliceCalibrator, calibrate_proba, calibrator_from_dict
from roadwork.trust.selective import AbstentionCertificate

__all__ = ["STAGES", "load_dataset", "load_policy"]

SPLITS_PREDICTED = ("val", "calib", "test")


def load_dataset(data_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    df = pd.read_parquet(data_dir / "dataset.parquet")
    report = json.loads((data_dir / "data_report.json").read_text())
    return df, list(report["classes"])


def load_policy(run_dir: Path) -> TrustPolicy:
    return TrustPolicy.load(run_dir / "policy" / "policy.json")


def _labels(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return df["label"].map(index).to_numpy(dtype=np.int64)


def _dir_digest(d: Path) -> str:
    """The data stage's manifest digest (what the cache key uses), or the folder name."""
    try:
        return str(json.loads((d / "manifest.json").read_text())["digest"])
    except (OSError, ValueError, KeyError):
        return hashlib.sha256(str(d).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- data


def _source_fingerprint(cfg: RunConfig) -> str:
    """For folders and manifests: a hash of every file's path, size and mtime (cheap, no reading)."""
    if cfg.data.source == "synthetic":
        return "synthetic"
    src = Path(cfg.data.source)
    h = hashlib.sha256(str(src.resolve()).encode())
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file())
    elif src.is_file():
        files = [src]
    else:
        return "missing"
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(src) if src.is_dir() else p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def stage_data(ctx: StageContext) -> dict[str, Any]:
    from roadwork.data.sources import build_dataset
    from roadwork.data.synthetic import generate_dataset

    d = ctx.cfg.data
    rows, root = None, None
    if d.source == "synthetic":
        root = ctx.out / "images"
        rows = generate_dataset(root, d.synthetic, progress=ctx.progress)
    df, classes, report = build_dataset(d, synthetic_rows=rows, synthetic_root=root)
    if root is not None:  # paths inside the run folder are stored relative, so the folder can move
        df["path"] = [f"images/{Path(p).name}" for p in df["path"]]
    df.to_parquet(ctx.out / "dataset.parquet", index=False)
    rep = {"classes": classes, "source": d.source, **report.to_dict()}
    (ctx.out / "data_report.json").write_text(json.dumps(rep, indent=2))
    return {"n": report.n_used, "skipped": len(report.skipped), "classes": classes}


def _abs_paths(df: pd.DataFrame, data_dir: Path) -> list[str]:
    return [p if Path(p).is_absolute() else str(data_dir / p) for p in df["path"]]


# --------------------------------------------------------------------------------------------- train


def stage_train(ctx: StageContext) -> dict[str, Any]:
    from roadwork.evaluation.plots import training_png
    from roadwork.models.factory import save_model
    from roadwork.training.loop import save_history, train_model

    df, classes = load_dataset(ctx.inputs["data"])
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    # one folder per data version: a checkpoint of other data is never resumed (the config is checked too)
    checkpoints = ctx.cfg.run_dir / "checkpoints" / f"train-{_dir_digest(ctx.inputs['data'])[:12]}"
    res = train_model(
        ctx.cfg.model,
        ctx.cfg.train,
        classes=classes,
        train_paths=_abs_paths(tr, ctx.inputs["data"]),
        train_labels=_labels(tr, classes),
        val_paths=_abs_paths(va, ctx.inputs["data"]),
        val_labels=_labels(va, classes),
        on_epoch=on_epoch,
        progress=ctx.progress,
        checkpoint_dir=checkpoints,  # outside the stage's temp folder, so an interrupted run resumes
    )
    save_model(res.model, res.card, ctx.out)
    save_history(res.history, ctx.out / "history.json")
    shutil.rmtree(
        checkpoints, ignore_errors=True
    )  # the stage's outputs are complete; the checkpoint is spent
    (ctx.out / "training.png").write_bytes(training_png(res.history))
    last = res.history[res.best_epoch - 1] if res.best_epoch else res.history[-1]
    return {
        "best_epoch": res.best_epoch,
        "epochs_run": len(res.history),
        "val_loss": last["val_loss"],
        "val_accuracy": last["val_accuracy"],
        "finetune": ctx.cfg.train.finetune,
        "trainable_params": res.trainable_params,
    }


# --------------------------------------------------------------------------------------------- predict


def stage_predict(ctx: StageContext) -> dict[str, Any]:
    from roadwork.models.factory import load_model
    from roadwork.training.loop import load_uint8, predict_logits

    df, classes = load_dataset(ctx.inputs["data"])
    model, card = load_model(ctx.inputs["train"])
    slice_cols = [c for c in df.columns if c not in ("id", "path", "label", "split", "sha256")]
    counts = {}
    for split in SPLITS_PREDICTED:
        part = df[df["split"] == split]
        u8 = load_uint8(
            _abs_paths(part, ctx.inputs["data"]), card.preprocess, f"reading {split}", ctx.progress
        )
        logits = predict_logits(model, u8, card.preprocess)
        Predictions(
            part["id"].to_numpy(),
            _labels(part, classes),
            logits.reshape(len(part), len(classes)),
            classes,
            {c: part[c].to_numpy() for c in slice_cols},
        ).to_parquet(ctx.out / f"predictions-{split}.parquet")
        counts[split] = len(part)
    return counts


def _preds(ctx: StageContext, split: str) -> Predictions:
    return Predictions.from_parquet(ctx.inputs["predict"] / f"predictions-{split}.parquet")


# --------------------------------------------------------------------------------------------- trust


def _slice_column(p: Predictions, column: str, key: str) -> np.ndarray:
    if column not in p.slices:
        raise ConfigError(
            f"{key}={column!r} is not a slice column of this dataset; it has "
            f"{', '.join(sorted(p.slices)) or 'none'}. Set {key} to one of those (or null)."
        )
    return p.slices[column]


def _calibrator_rows(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Rows of the calibration split the calibrator is fitted on: a stable hash of the id below ``fraction``
    (all rows at 1.0). The other rows fit the conformal threshold, abstention and risk control."""
    if fraction >= 1:
        return np.ones(len(ids), dtype=bool)
    u = np.array([int(hashlib.sha256(f"calibrator:{i}".encode()).hexdigest()[:15], 16) for i in ids]) / 16**15
    return u < fraction


def _fit_fraction(cfg: RunConfig) -> float:
    c = cfg.calibrate
    if c.fit_fraction is not None:
        return c.fit_fraction
    shared = c.method in ("none", "temperature") and not c.per_slice  # ≤ 1 parameter: share all rows
    return 1.0 if shared else 0.3


def stage_calibrate(ctx: StageContext) -> dict[str, Any]:
    cal = _preds(ctx, "calib")
    c = ctx.cfg.calibrate
    fraction = _fit_fraction(ctx.cfg)
    rows = _calibrator_rows(cal.ids, fraction)
    if fraction < 1 and (rows.sum() < 20 or (~rows).sum() < 20):
        raise ConfigError(
            f"calibrate.fit_fraction={fraction:g} leaves {int(rows.sum())} calibration rows for the calibrator "
            f"and {int((~rows).sum())} for the conformal threshold; each needs at least 20. Use more data or "
            "calibrate.fit_fraction=1 (share all rows)."
        )
    fit = cal.subset(rows)
    calibrator: Calibrator
    if c.per_slice:
        groups = _slice_column(fit, c.per_slice, "calibrate.per_slice")
        calibrator = SliceCalibrator(c.method, c.per_slice, min_count=c.min_slice_count).fit(
            fit.logits, fit.labels, groups
        )
    else:
        calibrator = make_calibrator(c.method).fit(fit.logits, fit.labels)
    (ctx.out / "calibrator.json").write_text(json.dumps(calibrator.to_dict(), indent=2))
    split = {
        "fit_fraction": fraction,
        "n_calibrator": int(rows.sum()),
        "n_trust": int((~rows).sum() or len(cal)),
    }
    (ctx.out / "split.json").write_text(json.dumps(split, indent=2))
    return {**calibrator.to_dict(), "rows": split}


def _trust_calib(ctx: StageContext) -> Predictions:
    """The calibration rows that fit conformal, abstention and risk control (disjoint from the calibrator's
    rows unless the calibrator shares them, ``fit_fraction`` 1)."""
    cal = _preds(ctx, "calib")
    fraction = json.loads((ctx.inputs["calibrate"] / "split.json").read_text())["fit_fraction"]
    return cal if fraction >= 1 else cal.subset(~_calibrator_rows(cal.ids, fraction))


def _calibrated_calib(ctx: StageContext) -> tuple[Predictions, np.ndarray]:
    cal = _trust_calib(ctx)
    calibrator = calibrator_from_dict(json.loads((ctx.inputs["calibrate"] / "calibrator.json").read_text()))
    return cal, calibrate_proba(calibrator, cal.logits, cal.slices)


def stage_conformal(ctx: StageContext) -> dict[str, Any]:
    cal, probs = _calibrated_calib(ctx)
    c = ctx.cfg.conformal
    conf = SplitConformal(
        alpha=c.alpha,
        score=c.method,
        randomized=c.randomized,
        mondrian=None if c.mondrian == "none" else c.mondrian,
        allow_empty=c.allow_empty,
        label_noise=c.label_noise,
        group_by=c.group_by,
    ).fit(probs, cal.labels, _slice_column(cal, c.group_by, "conformal.group_by") if c.group_by else None)
    (ctx.out / "conformal.json").write_text(json.dumps(conf.to_dict(), indent=2))
    return conf.to_dict()


def stage_selective(ctx: StageContext) -> dict[str, Any]:
    cal, probs = _calibrated_calib(ctx)
    s = ctx.cfg.selective
    cert = certify_abstention(
        probs.max(axis=1),
        probs.argmax(axis=1) == cal.labels,
        target_risk=s.target_risk,
        delta=s.delta,
        n_classes=cal.n_classes,
        method=s.method,
    )
    (ctx.out / "selective.json").write_text(json.dumps(cert.to_dict(), indent=2))
    return cert.to_dict()


def stage_policy(ctx: StageContext) -> dict[str, Any]:
    from roadwork.trust.operating import fit_operating_point
    from roadwork.trust.risk import FalseNegativeControl

    cal, probs = _calibrated_calib(ctx)
    classes = cal.classes
    positive = (
        "roadwork" if classes == ["no_roadwork", "roadwork"] else (classes[1] if len(classes) == 2 else None)
    )
    op, fnr = None, None
    pc = ctx.cfg.policy
    if positive is None and (pc.operating_point != "none" or pc.max_miss_rate is not None):
        raise ConfigError(
            f"policy.operating_point and policy.max_miss_rate need two classes; this task has {len(classes)}. "
            "Set policy.operating_point=none and policy.max_miss_rate=null."
        )
    if positive is not None and pc.max_miss_rate is not None:
        fnr = FalseNegativeControl(alpha=pc.max_miss_rate, positive=classes.index(positive)).fit(
            probs, cal.labels
        )
    if pc.operating_point != "none":
        assert positive is not None
        k = classes.index(positive)
        op = fit_operating_point(
            probs[:, k],
            cal.labels == k,
            criterion=pc.operating_point,
            target=pc.target,
        )
    policy = TrustPolicy(
        classes=classes,
        calibrator=calibrator_from_dict(
            json.loads((ctx.inputs["calibrate"] / "calibrator.json").read_text())
        ),
        conformal=SplitConformal.from_dict(
            json.loads((ctx.inputs["conformal"] / "conformal.json").read_text())
        ),
        abstention=AbstentionCertificate.from_dict(
            json.loads((ctx.inputs["selective"] / "selective.json").read_text())
        ),
        positive_class=positive,
        operating_point=op,
        risk_control=fnr,
    )
    policy.save(ctx.out / "policy.json")
    return {
        "classes": classes,
        "positive_class": positive,
        "operating_point": op and op.to_dict(),
        "risk_control": fnr and fnr.to_dict(),
    }


# --------------------------------------------------------------------------------------------- cascade


def _load_images(paths: list[str], what: str, progress: bool) -> list[Any]:
    from tqdm.auto import tqdm

    from roadwork.data.preprocess import load_rgb

    return [load_rgb(p) for p in tqdm(paths, desc=what, unit="img", leave=False, disable=not progress)]


def _deferral_targets(
    ctx: StageContext, policy: TrustPolicy, parts: dict[str, pd.DataFrame], classes: list[str]
) -> Any:
    """The large model's calibrated probability of the true class on train and val images: what a learned
    deferral gate weighs the small model against."""
    from roadwork.models.factory import load_model
    from roadwork.training.loop import Deferral, load_uint8, predict_logits

    model, card = load_model(ctx.inputs["train"])
    tr = parts["train"]
    u8 = load_uint8(
        _abs_paths(tr, ctx.inputs["data"]), card.preprocess, "deferral: model on train", ctx.progress
    )
    slice_cols = [c for c in tr.columns if c not in ("id", "path", "label", "split", "sha256")]
    p_tr = calibrate_proba(
        policy.calibrator,
        predict_logits(model, u8, card.preprocess),
        {c: tr[c].to_numpy() for c in slice_cols},
    )
    val = _preds(ctx, "val")
    p_val = calibrate_proba(policy.calibrator, val.logits, val.slices)
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
        _abs_paths(parts["calib"], data_dir), res.card.preprocess, "gatekeeper: calib", ctx.progress
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


def stage_cascade(ctx: StageContext) -> dict[str, Any]:
    """Train the cheap stages (gradient boosting on image features, a small network), calibrate each on the
    calibrator rows, measure every stage's ms/image, and certify the gate on the trust rows."""
    import dataclasses

    from roadwork.data.features import images_features
    from roadwork.export.cascade import StageRunner, count_flops, measure_cost_ms
    from roadwork.trust.cascade import CascadeStage, cascade_curve, fit_cascade, gate_grid, select_cascade

    c = ctx.cfg.cascade
    if not c.enabled:
        (ctx.out / "cascade.json").write_text(json.dumps({"enabled": False}))
        return {"enabled": False}
    if c.boosting == "none" and c.small is None:
        raise ConfigError(
            "cascade.enabled=true needs an earlier stage: set cascade.boosting (e.g. sklearn) or cascade.small."
        )
    df, classes = load_dataset(ctx.inputs["data"])
    data_dir = ctx.inputs["data"]
    policy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
    parts = {split: df[df["split"] == split] for split in ("train", "val", "calib", "test")}
    images = {
        split: _load_images(_abs_paths(part, data_dir), f"cascade: reading {split}", ctx.progress)
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
                    _abs_paths(parts[split], data_dir), f"cascade: reading {split}", ctx.progress
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
            deferral=_deferral_targets(ctx, policy, parts, classes) if learned else None,
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
        export_onnx(res.model, sample, ctx.out / f"stage{idx}-model.onnx", opset=ctx.cfg.export.opset)
        runner = StageRunner.network(ctx.out / f"stage{idx}-model.onnx", res.card.preprocess)
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
    export_onnx(model, preprocess(images["test"][:8], card.preprocess), tmp_onnx, opset=ctx.cfg.export.opset)
    runners.append(StageRunner.network(tmp_onnx, card.preprocess))
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

    # calibrate the early stages on the calibrator rows, certify the gate on the trust rows
    cal = _preds(ctx, "calib")
    fraction = json.loads((ctx.inputs["calibrate"] / "split.json").read_text())["fit_fraction"]
    fit_rows = _calibrator_rows(cal.ids, fraction)
    trust_rows = ~fit_rows if fraction < 1 else fit_rows
    method = ctx.cfg.calibrate.method
    for s in range(len(stages) - 1):
        stages[s].calibrator = make_calibrator(method).fit(logits["calib"][s][fit_rows], cal.labels[fit_rows])
    test = _preds(ctx, "test")

    def stage_probs(split: str, p: Predictions, rows: np.ndarray) -> list[np.ndarray]:
        cals = [st.calibrator for st in stages[:-1] if st.calibrator is not None]
        out = [cal.predict_proba(z[rows]) for cal, z in zip(cals, logits[split], strict=False)]
        sub = p.subset(rows)
        return [*out, calibrate_proba(policy.calibrator, sub.logits, sub.slices)]

    def stage_scores(split: str, rows: np.ndarray) -> list[np.ndarray | None]:
        g = gates[split]
        return [None if g.get(s) is None else 1 / (1 + np.exp(-g[s][rows])) for s in range(len(stages))]  # type: ignore[index]

    calib_probs = stage_probs("calib", cal, trust_rows)
    floor = policy.abstention.threshold if np.isfinite(policy.abstention.threshold) else 0.5
    if any(g is not None for g in gates["calib"].values()):
        floor = 0.5  # a learned gate's score is not a confidence: the abstention floor does not apply to it
    kw: dict[str, Any] = {
        "mode": c.mode,
        "target": c.target,
        "delta": c.delta,
        "floor": floor,
        "scores": stage_scores("calib", trust_rows),
    }
    candidates: list[dict[str, Any]] = []
    if c.select_stages:
        cascade, candidates = select_cascade(stages, calib_probs, cal.labels[trust_rows], **kw)
    else:
        cascade = fit_cascade(stages, calib_probs, cal.labels[trust_rows], **kw)
    spec = {
        "enabled": True,
        **cascade.to_dict(),
        "candidates": candidates,
        "all_stages": [st.to_dict() for st in stages],
    }
    (ctx.out / "cascade.json").write_text(json.dumps(spec, indent=2))
    grid = gate_grid(1 / len(classes))  # the whole frontier for the report; the certified gate stays ≥ floor
    every = np.ones(len(test), bool)
    curves = {
        "calib": cascade_curve(calib_probs, cal.labels[trust_rows], costs, grid, c.mode, kw["scores"]),
        "test": cascade_curve(
            stage_probs("test", test, every), test.labels, costs, grid, c.mode, stage_scores("test", every)
        ),
    }
    (ctx.out / "curves.json").write_text(
        json.dumps({k: {m: v.tolist() for m, v in cur.items()} for k, cur in curves.items()})
    )
    for split in logits:  # every stage's logits, in the project's one currency
        p = cal if split == "calib" else test
        for s_i, (st, z) in enumerate(zip(stages[:-1], logits[split], strict=False)):
            Predictions(p.ids, p.labels, z, p.classes, p.slices).to_parquet(
                ctx.out / f"predictions-{split}-{st.name}.parquet"
            )
            if gates[split].get(s_i) is not None:
                pd.DataFrame({"id": p.ids, "gate_logit": gates[split][s_i]}).to_parquet(
                    ctx.out / f"gate-{split}-{st.name}.parquet", index=False
                )
    return {
        "stages": [s.name for s in stages],
        "cost_ms": costs,
        "threshold": cascade.threshold,
        "certified": cascade.certified,
        "calib_risk": cascade.calib_risk,
    }


# --------------------------------------------------------------------------------------------- export


def stage_export(ctx: StageContext) -> dict[str, Any]:
    from roadwork._deps import require
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.errors import ArtifactError
    from roadwork.export.bundle import write_bundle
    from roadwork.export.onnx import export_onnx, onnx_logits, onnx_session
    from roadwork.models.factory import load_model

    e = ctx.cfg.export
    model, card = load_model(ctx.inputs["train"])
    df, _ = load_dataset(ctx.inputs["data"])
    test = df[df["split"] == "test"].head(e.parity_samples)
    x = preprocess([load_rgb(p) for p in _abs_paths(test, ctx.inputs["data"])], card.preprocess)
    onnx_path = ctx.out / "model.onnx.tmp"
    exporter = export_onnx(model, x, onnx_path, opset=e.opset)
    torch = require("torch")
    with torch.inference_mode():  # the reference: the torch model on the very inputs the bundle will see
        ref = model(torch.from_numpy(x)).double().numpy()
    got = onnx_logits(onnx_session(onnx_path), x)
    max_diff = float(np.abs(ref - got).max()) if len(x) else 0.0
    if max_diff > e.parity_atol:
        raise ArtifactError(
            f"ONNX parity check failed: max |logit difference| {max_diff:.2e} exceeds "
            f"export.parity_atol={e.parity_atol:g}. The exported graph is not trustworthy."
        )
    info: dict[str, Any] = {
        "exporter": exporter,
        "opset": e.opset,
        "parity_max_abs_diff": max_diff,
        "parity_n": len(x),
    }
    if e.tensorrt:
        from roadwork.export.variants import tensorrt_available

        if not tensorrt_available():
            raise ConfigError(
                "export.tensorrt=true needs an NVIDIA GPU and ONNX Runtime's TensorRT execution provider "
                "(pip install onnxruntime-gpu tensorrt); this machine has neither. Set export.tensorrt=false."
            )
    policy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
    extra: dict[str, Path] = {}
    spec = json.loads((ctx.inputs["cascade"] / "cascade.json").read_text())
    if spec.get("enabled"):
        from roadwork.trust.cascade import Cascade

        policy.cascade = Cascade.from_dict(spec)
        for st in policy.cascade.stages[:-1]:
            for name in (st.file, st.info.get("card")):
                if name:
                    extra[name] = ctx.inputs["cascade"] / name
        info["cascade"] = {"stages": policy.cascade.names, "threshold": policy.cascade.threshold}
    variants: dict[str, tuple[Path, dict[str, Any]]] = {}
    if e.int8 != "none":
        from roadwork.export.variants import quantize_int8

        train_rows = df[df["split"] == "train"].head(e.int8_calibration_images)
        calib_x = (
            preprocess([load_rgb(p) for p in _abs_paths(train_rows, ctx.inputs["data"])], card.preprocess)
            if e.int8 == "static"
            else None
        )
        q_path = ctx.out / "model-int8.onnx.tmp"
        q_info = quantize_int8(onnx_path, q_path, mode=e.int8, calibration=calib_x)
        info["int8"] = q_info | _variant_quality(ctx, card, policy, {"fp32": onnx_path, "int8": q_path})
        info["int8"]["size_mb"] = round(q_path.stat().st_size / 2**20, 3)
        variants["int8"] = (q_path, info["int8"])
    info["size_mb"] = round(onnx_path.stat().st_size / 2**20, 3)
    write_bundle(
        ctx.out / "bundle",
        onnx_path=onnx_path,
        card=card,
        policy=policy,
        export_info=info,
        variants=variants,
        extra_files=extra,
    )
    if e.triton:
        from roadwork.export.variants import write_triton_repository

        write_triton_repository(onnx_path, ctx.out / "triton", name=ctx.cfg.name)
        info["triton"] = str(Path("export") / "triton" / ctx.cfg.name)
    onnx_path.unlink()
    for path, _ in variants.values():
        path.unlink()
    return info


def _variant_quality(
    ctx: StageContext, card: Any, policy: TrustPolicy, models: dict[str, Path]
) -> dict[str, Any]:
    """Accuracy and ECE of each model file on the test split (through the same policy), and the change."""
    from roadwork.data.preprocess import load_rgb, preprocess
    from roadwork.export.onnx import onnx_logits, onnx_session
    from roadwork.trust import metrics as M

    df, _ = load_dataset(ctx.inputs["data"])
    test = df[df["split"] == "test"]
    x = preprocess([load_rgb(p) for p in _abs_paths(test, ctx.inputs["data"])], card.preprocess)
    y = _labels(test, card.classes)
    out: dict[str, Any] = {}
    for name, path in models.items():
        probs = policy.apply(onnx_logits(onnx_session(path), x)).probs
        out[f"test_accuracy_{name}"] = M.accuracy(probs, y)
        out[f"test_ece_{name}"] = M.ece(probs, y)
    out["test_accuracy_change"] = out["test_accuracy_int8"] - out["test_accuracy_fp32"]
    out["test_ece_change"] = out["test_ece_int8"] - out["test_ece_fp32"]
    out["test_n"] = len(y)
    return out


# --------------------------------------------------------------------------------------------- evaluate


def _stage_outputs(cascade_dir: Path, stage: Any, split: str) -> np.ndarray:
    """A cascade stage's stored outputs on a split as its model emits them: class logits, plus the gate logit
    as a last column for a learned gate."""
    z = Predictions.from_parquet(cascade_dir / f"predictions-{split}-{stage.name}.parquet").logits
    if stage.info.get("gate"):
        g = pd.read_parquet(cascade_dir / f"gate-{split}-{stage.name}.parquet")["gate_logit"].to_numpy()
        z = np.concatenate([z, g[:, None]], axis=1)
    return z


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    from roadwork.evaluation.metrics_table import (
        calibration_comparison,
        compute_metrics,
        conformal_comparison,
    )
    from roadwork.evaluation.plots import confusion_png, image_grid_png, reliability_png, risk_coverage_png
    from roadwork.evaluation.report import render_html, render_model_card
    from roadwork.trust._checks import softmax

    t0 = time.perf_counter()
    cfg = ctx.cfg
    test = _preds(ctx, "test")
    policy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
    metrics = compute_metrics(test, policy, n_bins=cfg.evaluate.ece_bins)
    metrics["calibration_comparison"] = calibration_comparison(
        _preds(ctx, "calib"), test, n_bins=cfg.evaluate.ece_bins
    )
    metrics["conformal_comparison"] = conformal_comparison(_trust_calib(ctx), test, policy)
    out = policy.apply(test.logits, test.slices)
    df, _ = load_dataset(ctx.inputs["data"])
    path_of = dict(zip(df["id"], _abs_paths(df, ctx.inputs["data"]), strict=True))

    figures: dict[str, tuple[bytes, str]] = {
        "reliability": (
            reliability_png(softmax(test.logits), out.probs, test.labels, cfg.evaluate.ece_bins),
            "Reliability: top-label confidence vs accuracy on test, before and after calibration",
        ),
        "risk_coverage": (
            risk_coverage_png(
                out.confidence,
                out.pred == test.labels,
                target=policy.abstention.target_risk,
                threshold=policy.abstention.threshold,
            ),
            "Risk–coverage: error on answered images as the model answers more of them",
        ),
        "confusion": (confusion_png(test.labels, out.pred, test.classes), "Confusion matrix: test split"),
    }
    train_png = ctx.inputs["train"] / "training.png"
    if train_png.is_file():
        figures["training"] = (
            train_png.read_bytes(),
            "Training curves: loss and validation accuracy per epoch",
        )

    def grid(rows: np.ndarray) -> bytes:  # caption: true label, then calibrated confidence and prediction
        caps = [
            f"true {test.classes[test.labels[i]]}\np={out.confidence[i]:.2f} {test.classes[out.pred[i]]}"
            for i in rows
        ]
        return image_grid_png([path_of[test.ids[i]] for i in rows], caps)

    k = min(cfg.evaluate.n_examples, len(test))
    if k:
        pick = np.random.default_rng(0).choice(len(test), size=k, replace=False)
        figures["samples"] = (
            grid(pick),
            "Sample test images: true label, calibrated confidence and prediction",
        )
        wrong = np.flatnonzero(out.pred != test.labels)
        worst = wrong[np.argsort(-out.confidence[wrong])][:k]
        if len(worst):
            figures["mistakes"] = (
                grid(worst),
                "Worst mistakes: the most confident wrong predictions on test",
            )
    fig_dir = ctx.out / "figures"
    fig_dir.mkdir()
    for name, (png, _) in figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)

    timing = {
        name: json.loads((p / "manifest.json").read_text())["seconds"]
        for name, p in ctx.inputs.items()
        if (p / "manifest.json").is_file()
    }
    timing["evaluate"] = time.perf_counter() - t0
    metrics["timing"] = timing
    spec = json.loads((ctx.inputs["cascade"] / "cascade.json").read_text())
    if spec.get("enabled"):
        from roadwork.evaluation.cascade import cascade_metrics
        from roadwork.trust.cascade import Cascade

        cpolicy = TrustPolicy.load(ctx.inputs["policy"] / "policy.json")
        cpolicy.cascade = Cascade.from_dict(spec)
        stage_logits = [
            _stage_outputs(ctx.inputs["cascade"], st, "test") for st in cpolicy.cascade.stages[:-1]
        ]
        curves = json.loads((ctx.inputs["cascade"] / "curves.json").read_text())
        metrics["cascade"], _ = cascade_metrics(cpolicy, [*stage_logits, test.logits], test, curves)
        metrics["cascade"]["candidates"] = spec.get("candidates", [])
    bundle_manifest = json.loads((ctx.inputs["export"] / "bundle" / "manifest.json").read_text())
    metrics["export"] = bundle_manifest["export"]
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame([{"slice": k, **v} for k, v in metrics["slices"].items()]).to_csv(
        ctx.out / "slices.csv", index=False
    )
    data_report = json.loads((ctx.inputs["data"] / "data_report.json").read_text())
    (ctx.out / "report.html").write_text(
        render_html(
            metrics=metrics,
            figures=figures,
            data_report=data_report,
            config_yaml=dump_config(cfg),
            run_name=cfg.name,
        )
    )
    (ctx.out / "MODEL_CARD.md").write_text(
        render_model_card(
            metrics=metrics, run_name=cfg.name, backbone=cfg.model.backbone, data_source=cfg.data.source
        )
    )
    return {"accuracy": metrics["test"]["accuracy"]}


def _code(*packages: str) -> tuple[str, ...]:
    """The source a stage runs: its packages, plus this file and the run config (edited → the stage reruns)."""
    return (*packages, "pipeline/stages.py", "config.py")


STAGES: list[Stage] = [
    Stage("data", (), ("data",), stage_data, fingerprint=_source_fingerprint, code=_code("data")),
    Stage("train", ("data",), ("model", "train"), stage_train, code=_code("data", "models", "training")),
    Stage("predict", ("data", "train"), (), stage_predict, code=_code("data", "models", "training", "trust")),
    Stage("calibrate", ("predict",), ("calibrate",), stage_calibrate, code=_code("trust")),
    Stage("conformal", ("predict", "calibrate"), ("conformal",), stage_conformal, code=_code("trust")),
    Stage("selective", ("predict", "calibrate"), ("selective",), stage_selective, code=_code("trust")),
    Stage(
        "policy",
        ("predict", "calibrate", "conformal", "selective"),
        ("policy",),
        stage_policy,
        code=_code("trust"),
    ),
    Stage(
        "cascade",
        ("data", "train", "predict", "calibrate", "policy"),
        ("cascade", "train", "calibrate", "export"),
        stage_cascade,
        code=_code("data", "models", "training", "export", "trust"),
    ),
    Stage(
        "export",
        ("data", "train", "policy", "cascade"),
        ("export",),
        stage_export,
        code=_code("data", "models", "export", "trust"),
    ),
    Stage(
        "evaluate",
        ("data", "train", "predict", "calibrate", "conformal", "selective", "policy", "cascade", "export"),
        ("evaluate",),
        stage_evaluate,
        code=_code("data", "evaluation", "trust"),
    ),
]
