"""``roadwork bench BUNDLE``: every runtime × precision of the bundle's model, measured side by side in one run,
and the fastest correct one chosen by that measurement.

Columns as Ultralytics' benchmark table: format, status, size MB, accuracy and ECE on labelled images (each
certified variant as it serves: decode, cascade and its *own* policy, end to end), their change vs ONNX Runtime fp32, max |logit difference| vs fp32, ms/img
and img/s at the serving batch size, speed-up over torch eager. Speed is the best of ``rounds`` interleaved
rounds (every variant runs once per round, so a noisy neighbour slows them all alike), after a warm-up.

The labelled images: ``images=FOLDER`` (one subfolder per class) or ``images=manifest.csv`` (path, label), else
the run's val split when the bundle sits in a run folder (``runs/<name>/export/bundle``) — never the test split
the run reports — else none (the accuracy recorded at export time, where the manifest has it). Torch eager runs the trained weights when the
run folder has them, else the same architecture with random weights (speed only).

Selection: the fastest variant that (a) has a policy certified on its own outputs, (b) loses at most
``max_accuracy_drop`` points of accuracy and raises ECE by at most ``max_ece_increase`` vs fp32 (the bundle's
``export.selection``, from the run's config), (c) is not slower than ONNX Runtime fp32. ``select=True``
records it in ``runtime.json`` (hashed in the manifest); ``Bundle.load(variant="auto")`` and
``roadwork serve BUNDLE variant=auto`` serve it. The selected variant's served figures on the run's test split
(end to end) go into ``runtime.json`` (``served_test``) and the run's ``evaluate/metrics.json``
(``variants[name]``, ``served_variant``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadwork.errors import InputError
from roadwork.export.bundle import BATCH_DEPENDENT, Bundle, batch_dependent, record_runtime_choice
from roadwork.export.runtime import (
    RuntimeSpec,
    RuntimeUnavailable,
    cpu_summary,
    open_session,
    runtime_status,
)
from roadwork.trust.policy import TrustPolicy

__all__ = [
    "BenchResult",
    "bench_bundle",
    "bench_cli",
    "format_table",
    "measure",
    "measure_bundle",
    "record_selection",
    "select_variant",
    "served_test_figures",
]

_FORMATS = {
    "fp32": "ONNX fp32",
    "int8": "ONNX int8",
    "openvino-fp32": "OpenVINO fp32",
    "openvino-bf16": "OpenVINO bf16",
    "openvino-int8": "OpenVINO int8",
}


class BenchResult(list[dict[str, Any]]):
    """The rows (one per format) plus ``meta``: machine, images used, budget, the selection."""

    meta: dict[str, Any]


@dataclass
class _Candidate:
    row: dict[str, Any]
    run: Callable[[], object]
    best: float = 0.0


@dataclass
class _Inputs:
    """What every variant runs on: ``x`` (one serving batch, for speed) and the labelled images ``xl``/``y``."""

    x: np.ndarray
    xl: np.ndarray | None
    y: np.ndarray
    source: str
    batch: int
    threads: int
    paths: list[str] = field(default_factory=list)  # the labelled images, for the served path end to end


def _read_labelled(src: Path) -> Any:
    """A folder with one subfolder per class, or a manifest (``.csv``/``.parquet``: path, label)."""
    import pandas as pd

    from roadwork.data.listing import IMAGE_SUFFIXES

    if src.is_dir():
        files = sorted(f for f in src.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        return pd.DataFrame(
            {"path": [str(f) for f in files], "label": [f.relative_to(src).parts[0] for f in files]}
        )
    df = pd.read_parquet(src) if src.suffix.lower() == ".parquet" else pd.read_csv(src)
    if not {"path", "label"} <= set(df.columns):
        raise InputError(
            f"roadwork bench: images={str(src)!r} needs path and label columns; it has {list(df.columns)}."
        )
    return df.assign(path=[p if Path(p).is_absolute() else str(src.parent / p) for p in df["path"]])


def _labelled_images(
    bundle: Bundle, images: str | None, limit: int, split: str = "val"
) -> tuple[list[str], np.ndarray, str]:
    """Paths, labels (class indices) and a description of where they came from: ``images=``, else the run's
    ``split`` — the val split for the selection, so that it never looks at the test split it then reports."""
    import pandas as pd

    if images is not None:
        src = Path(images)
        if not src.exists():
            raise InputError(
                f"roadwork bench: images={images!r} does not exist; pass a folder with one subfolder per "
                "class or a manifest.csv with path,label columns."
            )
        df, what = _read_labelled(src), f"images={images}"
    else:
        run_dir = bundle.path.resolve().parent.parent
        data = run_dir / "data" / "dataset.parquet"
        if bundle.path.resolve().parent.name != "export" or not data.is_file():
            return [], np.zeros(0, np.int64), "none (pass images=FOLDER|manifest.csv)"
        df = pd.read_parquet(data)
        df = df[df["split"] == split]
        df = df.assign(path=[p if Path(p).is_absolute() else str(data.parent / p) for p in df["path"]])
        what = f"the run's {split} split ({run_dir.name})"
    unknown = sorted(set(df["label"]) - set(bundle.classes))
    if unknown:
        raise InputError(
            f"roadwork bench: labels {unknown[:5]} of {what} are not classes of the bundle ({bundle.classes})."
        )
    df = df.head(limit)
    index = {c: i for i, c in enumerate(bundle.classes)}
    return list(df["path"]), df["label"].map(index).to_numpy(np.int64), f"{what}, {len(df)} images"


def _inputs(bundle: Bundle, images: str | None, max_images: int, batch: int, threads: int) -> _Inputs:
    paths, y, source = _labelled_images(bundle, images, max_images)
    xl = None
    if paths:
        from roadwork.data.preprocess import load_rgb, preprocess

        xl = preprocess([load_rgb(p, bundle.decode_side) for p in paths], bundle.card.preprocess)
    s = bundle.card.preprocess.size
    x = np.random.default_rng(0).normal(size=(batch, 3, s, s)).astype(np.float32)
    return _Inputs(x, xl, y, source, batch, threads, list(paths))


def _torch_model(bundle: Bundle) -> tuple[Any, str]:
    """The trained network when the run folder has it, else the architecture with random weights."""
    from roadwork.config import ModelConfig
    from roadwork.models.factory import create_model, load_model

    train = bundle.path.resolve().parent.parent / "train"
    if (train / "model.safetensors").is_file():
        model, _ = load_model(train)
        return model.eval(), "trained weights"
    s = bundle.card.preprocess.size
    cfg = ModelConfig(
        backbone=bundle.card.backbone, pretrained=False, image_size=s, kwargs=bundle.card.kwargs
    )
    model, _ = create_model(cfg, len(bundle.classes))
    return model.eval(), "random weights: speed only"


def _quality(row: dict[str, Any], logits: np.ndarray, policy: TrustPolicy, y: np.ndarray) -> None:
    """The model alone through the policy's calibrator (what torch eager and uncertified variants can show)."""
    from roadwork.trust import metrics as M

    probs = policy.apply(logits).probs
    row["accuracy"], row["ece"] = M.accuracy(probs, y), M.ece(probs, y)
    row["accuracy_model"], row["ece_model"] = row["accuracy"], row["ece"]
    row["quality_source"] = "model alone"


def _served_quality(row: dict[str, Any], bundle: Bundle, name: str, inp: _Inputs) -> None:
    """Accuracy and ECE of what this variant serves, end to end (decode, cascade, its own policy), on the
    labelled images: what the selection compares."""
    from roadwork.trust import metrics as M

    out = Bundle.load(bundle.path, variant=name, threads=inp.threads).predict_output(inp.paths)
    row["accuracy"], row["ece"] = float((out.pred == inp.y).mean()), M.ece(out.probs, inp.y)
    row["quality_source"] = "served"


def _torch_candidate(bundle: Bundle, inp: _Inputs) -> tuple[dict[str, Any], _Candidate | None]:
    """The reference: torch eager (the run's trained weights when it has them), scored like the others."""
    row: dict[str, Any] = {"format": "torch eager", "variant": None}
    try:
        import torch
    except ImportError:
        return row | {"status": "torch not installed (train extra)"}, None
    model, weights = _torch_model(bundle)
    if inp.threads:
        torch.set_num_threads(inp.threads)
    xt = torch.from_numpy(inp.x)

    def run() -> None:
        with torch.inference_mode():
            model(xt)

    row |= {
        "status": f"ok ({weights})",
        "size_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20,
        "threads": torch.get_num_threads(),
    }
    if inp.xl is not None and weights == "trained weights":
        xl = inp.xl
        with torch.inference_mode():
            z = np.concatenate(
                [model(torch.from_numpy(xl[i : i + 64])).double().numpy() for i in range(0, len(xl), 64)]
            )
        _quality(row, z, bundle.policy, inp.y)
    return row, _Candidate(row, run)


def _variant_list(bundle: Bundle) -> list[tuple[str, str, str | None]]:
    """(variant, model file, certified policy file) of every runtime × precision the bundle can run: its
    manifest's variants, and OpenVINO fp32/bf16 of model.onnx without a policy (measured, never selected)."""
    known = bundle.manifest.get("variants", {})
    specs: list[tuple[str, str, str | None]] = [("fp32", "model.onnx", "policy.json")]
    specs += [(n, v["file"], v.get("policy")) for n, v in known.items() if n != "fp32"]
    specs += [(n, "model.onnx", None) for n in ("openvino-fp32", "openvino-bf16") if n not in known]
    return specs


def _runtime_candidate(
    bundle: Bundle, variant: tuple[str, str, str | None], inp: _Inputs
) -> tuple[dict[str, Any], _Candidate | None]:
    """One runtime × precision: opened, scored on the labelled images through its own policy, ready to time."""
    name, fname, policy_file = variant
    known = bundle.manifest.get("variants", {})
    spec = RuntimeSpec.from_variant(name, known.get(name), threads=inp.threads)
    row: dict[str, Any] = {
        "format": _FORMATS.get(name, name),
        "variant": name,
        "runtime": spec.runtime,
        "precision": spec.precision,
        "certified": policy_file is not None,
    }
    listed = bundle.manifest.get("files", {})
    odd = [
        f
        for f in (fname, *([policy_file] if policy_file else []))
        if not isinstance(f, str) or f not in listed
    ]
    if odd:  # only files the manifest lists (plain names inside the folder, hashed at load) are ever opened
        return row | {"status": f"skipped: the manifest does not list {str(odd[0])[:60]!r}"}, None
    status = BATCH_DEPENDENT if batch_dependent(known.get(name)) else runtime_status(spec)
    if status != "ok":
        return row | {"status": status}, None
    try:
        sess = open_session(bundle.path / fname, spec)
    except RuntimeUnavailable as e:
        return row | {"status": str(e)}, None
    files = [bundle.path / fname]
    if fname.endswith(".xml"):  # an OpenVINO IR: its weights are in the .bin beside it
        files.append(files[0].with_suffix(".bin"))
    row |= {
        "status": "ok" if policy_file else "ok, no certified policy (export.openvino=true)",
        "size_mb": sum(f.stat().st_size for f in files) / 2**20,
        "threads": sess.info.get("intra_op_threads", sess.info.get("threads")),
        "session": {k: v for k, v in sess.info.items() if k not in ("runtime", "precision")},
    }
    if inp.xl is not None:
        row["logits"] = sess.logits(inp.xl, batch_size=inp.batch)
        _quality(row, row["logits"], TrustPolicy.load(bundle.path / (policy_file or "policy.json")), inp.y)
        if policy_file is not None:
            _served_quality(row, bundle, name, inp)
    elif f"test_accuracy_{name}" in known.get(name, {}):  # recorded at export time
        row["accuracy"], row["ece"] = known[name][f"test_accuracy_{name}"], known[name][f"test_ece_{name}"]
        row["quality_source"] = "export"

    def run(s: Any = sess.session, x: np.ndarray = inp.x) -> None:
        s.run(None, {"input": x})

    return row, _Candidate(row, run)


def measure(cands: list[_Candidate], *, batch: int, seconds: float, rounds: int) -> None:
    """Images per second of each candidate at ``batch`` images per call: the best of ``rounds`` interleaved
    rounds (each candidate runs ``seconds / rounds`` per round, so a noisy neighbour slows them all alike),
    after two warm-up calls (allocation, kernel compilation, caches). Sets ``img_s`` and ``ms_img``."""
    for c in cands:
        c.run()
        c.run()
    slot = seconds / rounds
    for _ in range(rounds):
        for c in cands:
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < slot or done == 0:
                c.run()
                done += batch
            c.best = max(c.best, done / (time.perf_counter() - t0))
    for c in cands:
        c.row["img_s"], c.row["ms_img"] = c.best, 1000 / c.best


def _compare(rows: list[dict[str, Any]], bundle: Bundle) -> None:
    """Speed-up vs torch eager, accuracy/ECE change and max |logit difference| vs ONNX Runtime fp32."""
    base = next((r.get("img_s") for r in rows if r["format"] == "torch eager"), None)
    fp32 = next(r for r in rows if r.get("variant") == "fp32")
    known = bundle.manifest.get("variants", {})
    if "accuracy" not in fp32 and "test_accuracy_fp32" in known.get("int8", {}):  # recorded at export time
        fp32["accuracy"], fp32["ece"] = known["int8"]["test_accuracy_fp32"], known["int8"]["test_ece_fp32"]
        fp32["quality_source"] = "export"
    if bundle.manifest.get("export", {}).get("parity_max_abs_diff") is not None:
        fp32["parity"] = bundle.manifest["export"]["parity_max_abs_diff"]
    ref = fp32.get("logits")
    for r in rows:
        if "img_s" in r:
            r["speedup"] = r["img_s"] / base if base else None
        if r.get("variant") and "accuracy" in r and "accuracy" in fp32:
            # like with like: served vs served where both are served, else the model alone vs the model alone
            served = r.get("quality_source") == fp32.get("quality_source") == "served"
            acc, ece = (
                ("accuracy", "ece")
                if served or "accuracy_model" not in fp32
                else ("accuracy_model", "ece_model")
            )
            if acc in r:
                r["accuracy_change"] = r[acc] - fp32[acc]
                r["ece_change"] = r[ece] - fp32[ece]
        if r is not fp32 and ref is not None and r.get("logits") is not None:
            r["max_diff"] = float(np.abs(r["logits"] - ref).max())
    for r in rows:
        r.pop("logits", None)


def _budget(
    bundle: Bundle, max_accuracy_drop: float | None, max_ece_increase: float | None
) -> dict[str, float]:
    """The selection budget: the bundle's ``export.selection`` (0.5 points, 0.01 ECE), overridden by the caller."""
    budget = {"max_accuracy_drop": 0.5, "max_ece_increase": 0.01}
    budget |= bundle.manifest.get("export", {}).get("selection", {})
    if max_accuracy_drop is not None:
        budget["max_accuracy_drop"] = max_accuracy_drop
    if max_ece_increase is not None:
        budget["max_ece_increase"] = max_ece_increase
    return budget


def measure_bundle(
    bundle: Bundle,
    *,
    batch: int = 8,
    seconds: float = 3.0,
    rounds: int = 5,
    threads: int = 0,
    images: str | None = None,
    max_images: int = 512,
) -> tuple[list[dict[str, Any]], str]:
    """Step 1 of :func:`bench_bundle`: one row per runtime × precision (torch eager first), each scored on the
    labelled images through its own policy and timed in one interleaved run; returns the rows and where the
    labelled images came from."""
    inp = _inputs(bundle, images, max_images, batch, threads)
    rows, cands = [], []
    for row, cand in [
        _torch_candidate(bundle, inp),
        *(_runtime_candidate(bundle, v, inp) for v in _variant_list(bundle)),
    ]:
        rows.append(row)
        if cand is not None:
            cands.append(cand)
    if "int8" not in bundle.manifest.get("variants", {}):
        rows.insert(
            2, {"format": "ONNX int8", "variant": "int8", "status": "not exported (export.int8=static)"}
        )
    measure(cands, batch=batch, seconds=seconds, rounds=rounds)
    from roadwork.export.variants import tensorrt_available

    trt = "available" if tensorrt_available() else "needs an NVIDIA GPU + onnxruntime-gpu"
    rows.append({"format": "TensorRT (ORT EP)", "variant": None, "status": trt})
    _compare(rows, bundle)
    return rows, inp.source


def bench_bundle(
    path: str,
    *,
    batch: int = 8,
    seconds: float = 3.0,
    rounds: int = 5,
    threads: int = 0,
    images: str | None = None,
    max_images: int = 512,
    select: bool = False,
    max_accuracy_drop: float | None = None,
    max_ece_increase: float | None = None,
) -> BenchResult:
    """Measure every runtime × precision of the bundle at ``batch`` images per call (``seconds`` in all per
    variant, split over ``rounds`` interleaved rounds), score each on labelled images (:func:`measure_bundle`),
    mark the selected one (``row["selected"]``, :func:`select_variant`) and with ``select`` record it in the
    bundle (:func:`record_selection`). Budgets default to the bundle's ``export.selection`` (0.5 points,
    0.01 ECE). ``threads=0``: each runtime's default (recorded per row)."""
    if batch < 1 or seconds <= 0 or rounds < 1:
        raise InputError(
            f"roadwork bench: batch, seconds and rounds must be positive. Got {batch}, {seconds}, {rounds}."
        )
    bundle = Bundle.load(path)
    budget = _budget(bundle, max_accuracy_drop, max_ece_increase)
    rows, source = measure_bundle(
        bundle,
        batch=batch,
        seconds=seconds,
        rounds=rounds,
        threads=threads,
        images=images,
        max_images=max_images,
    )
    chosen = select_variant(rows, **budget)
    result = BenchResult(rows)
    result.meta = {
        "bundle": str(bundle.path),
        "batch": batch,
        "rounds": rounds,
        "threads": threads,
        "images": source,
        "budget": budget,
        "cpu": cpu_summary(),
        "selected": chosen["variant"],
    }
    if select:
        served = served_test_figures(bundle, chosen["variant"], threads)
        result.meta["served_test"] = served
        result.meta["recorded"] = str(record_selection(bundle.path, rows, chosen, result.meta))
        if served is not None:
            _record_in_run_metrics(bundle.path, chosen["variant"], served)
    return result


def served_test_figures(bundle: Bundle, variant: str, threads: int = 0) -> dict[str, Any] | None:
    """The figures of what ``variant`` serves, end to end (decode, cascade, its own policy), on the run's test
    split — the split the run's report is about, never looked at by the selection (None outside a run folder)."""
    from roadwork.trust import metrics as M

    paths, y, source = _labelled_images(bundle, None, 10**9, split="test")
    if not paths:
        return None
    served = Bundle.load(bundle.path, variant=variant, threads=threads)
    out = served.predict_output(paths)
    answered = ~out.abstain
    correct = out.pred == y
    return {
        "variant": variant,
        "what": f"the bundle's {variant} variant end to end (decode, cascade, its own policy) on {source}",
        "n": len(y),
        "accuracy": float(correct.mean()),
        "ece": M.ece(out.probs, y),
        "coverage": float(out.sets[np.arange(len(y)), y].mean()),
        "answered": float(answered.mean()),
        "selective_risk": float(1 - correct[answered].mean()) if answered.any() else None,
        # the variant's own certificate (its policy file), which the model card's fp32 guarantees are not
        "certified": served.policy.abstention.to_dict() | {"policy_file": _variant_policy_file(served)},
    }


def _variant_policy_file(bundle: Bundle) -> str:
    return str(bundle.manifest.get("variants", {}).get(bundle.variant, {}).get("policy", "policy.json"))


def _record_in_run_metrics(bundle_path: Path, variant: str, served: dict[str, Any]) -> None:
    """The run's ``evaluate/metrics.json`` gets ``variants[variant]`` (and ``served_variant``), its report and
    model card the served-variant section, and the evaluate stage's manifest the files' new sizes and sha256,
    so the stage stays a valid cache entry."""
    import json

    from roadwork.evaluation.report import refresh_outputs, with_variants
    from roadwork.jsonio import write_json

    evaluate = bundle_path.resolve().parent.parent / "evaluate"
    metrics_file, manifest_file = evaluate / "metrics.json", evaluate / "manifest.json"
    if not (metrics_file.is_file() and manifest_file.is_file()):
        return
    metrics = json.loads(metrics_file.read_text())
    metrics.setdefault("variants", {})[variant] = served
    metrics["served_variant"] = variant  # what variant=auto serves now
    write_json(metrics_file, metrics)
    texts = {"metrics.json": metrics_file.read_text()}
    report, card = evaluate / "report.html", evaluate / "MODEL_CARD.md"
    if report.is_file() and card.is_file():
        new_report, new_card = with_variants(report.read_text(), card.read_text(), metrics)
        texts |= {"report.html": new_report, "MODEL_CARD.md": new_card}
    refresh_outputs(evaluate, texts)


def record_selection(
    path: str | Path, rows: list[dict[str, Any]], chosen: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Step 3 of :func:`bench_bundle`: write the choice into the bundle's ``runtime.json`` (hashed in the
    manifest, see :func:`record_runtime_choice`) with what it was measured on: the machine, the threads each
    runtime ran with, the speed of every variant, the labelled images and the budget."""
    record = {
        "variant": chosen["variant"],
        "runtime": chosen["runtime"],
        "precision": chosen["precision"],
        "threads": meta["threads"],  # what the server asks for (0: the runtime's default)
        "threads_effective": chosen.get("threads"),
        "session": chosen.get("session", {}),
        "batch": meta["batch"],
        "img_s": chosen["img_s"],
        "ms_img": chosen["ms_img"],
        "accuracy": chosen.get("accuracy"),  # on the selection's labelled images (the val split by default)
        "ece": chosen.get("ece"),
        "served_test": meta.get("served_test"),  # end to end on the run's test split: what it serves
        "images": meta["images"],
        "budget": meta["budget"],
        "cpu": meta["cpu"],
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measured": {
            r["variant"]: {"img_s": r["img_s"], "threads": r.get("threads")}
            for r in rows
            if r.get("variant") and "img_s" in r
        },
    }
    return record_runtime_choice(path, record)


def select_variant(
    rows: list[dict[str, Any]], *, max_accuracy_drop: float, max_ece_increase: float
) -> dict[str, Any]:
    """Mark (``selected``, ``note``) and return the fastest row that is certified, within the budget vs fp32
    (accuracy drop in points, ECE increase) and not slower than ONNX Runtime fp32. fp32 is the fallback."""
    fp32 = next(r for r in rows if r.get("variant") == "fp32")
    if "img_s" not in fp32:
        raise InputError(f"roadwork bench: ONNX Runtime fp32 could not run ({fp32.get('status')}).")
    eligible = [fp32]
    for r in rows:
        if r is fp32 or not r.get("variant") or "img_s" not in r:
            continue
        notes = []
        if r["img_s"] < fp32["img_s"]:
            notes.append(f"slower than ONNX fp32 ({fp32['img_s'] / r['img_s']:.1f}x): never selected")
        if "accuracy_change" not in r:
            notes.append("accuracy not measured (pass images=)")
        else:
            if -100 * r["accuracy_change"] > max_accuracy_drop:
                notes.append(
                    f"accuracy {100 * r['accuracy_change']:+.2f} pt > -{max_accuracy_drop:g} pt budget"
                )
            if r["ece_change"] > max_ece_increase:
                notes.append(f"ECE {r['ece_change']:+.4f} > +{max_ece_increase:g} budget")
        if not r.get("certified"):
            notes.append("no policy certified on its outputs: not selectable")
        if notes:
            r["note"] = "; ".join(notes)
        else:
            eligible.append(r)
    chosen = max(eligible, key=lambda r: r["img_s"])
    chosen["selected"] = True
    return chosen


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (selected row in bold with ✓), preceded by the machine (CPU model, cores,
    flags), batch, rounds, threads, labelled images and budget when ``rows`` is a :class:`BenchResult`."""

    def f(v: Any, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    lines = []
    meta = getattr(rows, "meta", None)
    if meta:
        cpu = meta["cpu"]
        lines += [
            f"cpu: {cpu['model']}; {cpu['cores']} cores; flags {' '.join(cpu['flags']) or 'none of note'}",
            f"batch {meta['batch']}, best of {meta['rounds']} interleaved rounds, threads "
            f"{meta['threads'] or 'default'}; accuracy/ECE on {meta['images']}; budget "
            f"-{meta['budget']['max_accuracy_drop']:g} pt accuracy, +{meta['budget']['max_ece_increase']:g} ECE",
            "",
        ]
    lines += [
        "| format | status | size MB | accuracy | Δ acc pt | ECE | Δ ECE | max Δ logit | threads | ms/img | img/s "
        "| vs torch eager | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        change = r.get("accuracy_change")
        lines.append(
            f"| {'**' + r['format'] + '** ✓' if r.get('selected') else r['format']} | {r['status']} | "
            f"{f(r.get('size_mb'), '.2f')} | {f(r.get('accuracy'), '.4f')} | "
            f"{f(None if change is None else 100 * change, '+.2f')} | {f(r.get('ece'), '.4f')} | "
            f"{f(r.get('ece_change'), '+.4f')} | {f(r.get('max_diff'), '.1e')} | {f(r.get('threads'), 'd')} | "
            f"{f(r.get('ms_img'), '.2f')} | "
            f"{f(r.get('img_s'), '.1f')} | {f(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} | "
            f"{r.get('note', '')} |"
        )
    if meta:
        lines.append("")
        lines.append(
            f"selected: {meta['selected']}"
            + (f" (recorded in {meta['recorded']})" if "recorded" in meta else "")
        )
    return "\n".join(lines)


USAGE = (
    "Usage: roadwork bench BUNDLE [batch=8] [seconds=3] [rounds=5] [threads=0] [images=FOLDER|manifest.csv] "
    "[select=false] [max_accuracy_drop=0.5] [max_ece_increase=0.01]"
)


def bench_cli(args: list[str]) -> str:
    """``roadwork bench``'s arguments → the printed table (what :func:`bench_bundle` measured)."""
    if not args or "=" in args[0]:
        raise InputError(USAGE)
    numbers = {"batch": int, "seconds": float, "rounds": int, "threads": int, "max_images": int}
    numbers |= {"max_accuracy_drop": float, "max_ece_increase": float}
    opts: dict[str, Any] = {}
    for a in args[1:]:
        key, _, val = a.partition("=")
        if key == "images":
            opts[key] = val
        elif key == "select":
            if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise InputError(f"roadwork bench: select={val!r} must be true or false.")
            opts[key] = val.lower() in ("true", "1", "yes")
        elif key in numbers:
            try:
                opts[key] = numbers[key](val)
            except ValueError:
                raise InputError(f"roadwork bench: {key}={val!r} is not a number.") from None
        else:
            import difflib

            close = difflib.get_close_matches(key, [*numbers, "images", "select"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InputError(f"roadwork bench: unknown option {key!r}.{hint}\n{USAGE}")
    return format_table(bench_bundle(args[0], **opts))
