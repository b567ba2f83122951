"""``roadwork bench BUNDLE``: every runtime × precision of the bundle's model, measured side by side in one run,
and the fastest correct one chosen by that measurement.

Columns as Ultralytics' benchmark table: format, status, size MB, accuracy and ECE on labelled images (each
variant through its *own* policy), their change vs ONNX Runtime fp32, max |logit difference| vs fp32, ms/img
and img/s at the serving batch size, speed-up over torch eager. Speed is the best of ``rounds`` interleaved
rounds (every variant runs once per round, so a noisy neighbour slows them all alike), after a warm-up.

The labelled images: ``images=FOLDER`` (one subfolder per class) or ``images=manifest.csv`` (path, label), else
the run's test split when the bundle sits in a run folder (``runs/<name>/export/bundle``), else none (the
accuracy recorded at export time, where the manifest has it). Torch eager runs the trained weights when the
run folder has them, else the same architecture with random weights (speed only).

Selection: the fastest variant that (a) has a policy certified on its own outputs, (b) loses at most
``max_accuracy_drop`` points of accuracy and raises ECE by at most ``max_ece_increase`` vs fp32 (the bundle's
``export.selection``, from the run's config), (c) is not slower than ONNX Runtime fp32. ``select=True``
records it in ``runtime.json`` (hashed in the manifest); ``Bundle.load(variant="auto")`` and
``roadwork serve BUNDLE variant=auto`` serve it.
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
from roadwork.export.bundle import Bundle, record_runtime_choice
from roadwork.export.runtime import (
    RuntimeSpec,
    RuntimeUnavailable,
    cpu_summary,
    open_session,
    runtime_status,
)
from roadwork.trust.policy import TrustPolicy

__all__ = ["BenchResult", "bench_bundle", "format_table", "select_variant"]

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
    times: list[float] = field(default_factory=list)


def _labelled_images(bundle: Bundle, images: str | None, limit: int) -> tuple[list[str], np.ndarray, str]:
    """Paths, labels (class indices) and a description of where they came from."""
    import pandas as pd

    from roadwork.data.sources import _from_folder, _from_manifest  # the data stage's own readers

    if images is not None:
        src = Path(images)
        if not src.exists():
            raise InputError(
                f"roadwork bench: images={images!r} does not exist; pass a folder with one subfolder per "
                "class or a manifest.csv with path,label columns."
            )
        df = _from_folder(src) if src.is_dir() else _from_manifest(src)
        what = f"images={images}"
    else:
        run_dir = bundle.path.resolve().parent.parent
        data = run_dir / "data" / "dataset.parquet"
        if bundle.path.resolve().parent.name != "export" or not data.is_file():
            return [], np.zeros(0, np.int64), "none (pass images=FOLDER|manifest.csv)"
        df = pd.read_parquet(data)
        df = df[df["split"] == "test"]
        df = df.assign(path=[p if Path(p).is_absolute() else str(data.parent / p) for p in df["path"]])
        what = f"the run's test split ({run_dir.name})"
    unknown = sorted(set(df["label"]) - set(bundle.classes))
    if unknown:
        raise InputError(
            f"roadwork bench: labels {unknown[:5]} of {what} are not classes of the bundle ({bundle.classes})."
        )
    df = df.head(limit)
    index = {c: i for i, c in enumerate(bundle.classes)}
    return list(df["path"]), df["label"].map(index).to_numpy(np.int64), f"{what}, {len(df)} images"


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
    from roadwork.trust import metrics as M

    probs = policy.apply(logits).probs
    row["accuracy"], row["ece"] = M.accuracy(probs, y), M.ece(probs, y)


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
    variant, split over ``rounds`` interleaved rounds), score each on labelled images, mark the selected one
    (``row["selected"]``) and with ``select`` record it in the bundle. Budgets default to the bundle's
    ``export.selection`` (0.5 points, 0.01 ECE)."""
    if batch < 1 or seconds <= 0 or rounds < 1:
        raise InputError(
            f"roadwork bench: batch, seconds and rounds must be positive. Got {batch}, {seconds}, {rounds}."
        )
    bundle = Bundle.load(path)
    budget = {"max_accuracy_drop": 0.5, "max_ece_increase": 0.01}
    budget |= bundle.manifest.get("export", {}).get("selection", {})
    if max_accuracy_drop is not None:
        budget["max_accuracy_drop"] = max_accuracy_drop
    if max_ece_increase is not None:
        budget["max_ece_increase"] = max_ece_increase
    paths, y, source = _labelled_images(bundle, images, max_images)
    xl = None
    if paths:
        from roadwork.data.preprocess import load_rgb, preprocess

        xl = preprocess([load_rgb(p) for p in paths], bundle.card.preprocess)
    s = bundle.card.preprocess.size
    x = np.random.default_rng(0).normal(size=(batch, 3, s, s)).astype(np.float32)
    known = bundle.manifest.get("variants", {})
    cands: list[_Candidate] = []
    rows: list[dict[str, Any]] = []

    torch_row: dict[str, Any] = {"format": "torch eager", "variant": None}
    rows.append(torch_row)
    try:
        import torch

        model, weights = _torch_model(bundle)
        xt = torch.from_numpy(x)
        if threads:
            torch.set_num_threads(threads)

        def run_torch() -> None:
            with torch.inference_mode():
                model(xt)

        torch_row |= {
            "status": f"ok ({weights})",
            "size_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20,
            "threads": torch.get_num_threads(),
        }
        if xl is not None and weights == "trained weights":
            with torch.inference_mode():
                z = np.concatenate(
                    [model(torch.from_numpy(xl[i : i + 64])).double().numpy() for i in range(0, len(xl), 64)]
                )
            _quality(torch_row, z, bundle.policy, y)
        cands.append(_Candidate(torch_row, run_torch))
    except ImportError:
        torch_row["status"] = "torch not installed (train extra)"

    # every runtime × precision this bundle has a model file for; those without a certified policy are measured
    # (the fp32 policy scores them) but never selected
    specs: list[tuple[str, str, str | None]] = [("fp32", "model.onnx", "policy.json")]
    specs += [(n, v["file"], v.get("policy")) for n, v in known.items() if n != "fp32"]
    for name in ("openvino-fp32", "openvino-bf16"):
        if name not in known:
            specs.append((name, "model.onnx", None))
    if "int8" not in known:
        rows.append({"format": "ONNX int8", "variant": "int8", "status": "not exported (export.int8=static)"})
    ref_logits: np.ndarray | None = None
    for name, fname, policy_file in specs:
        spec = RuntimeSpec.from_variant(name, known.get(name), threads=threads)
        row: dict[str, Any] = {
            "format": _FORMATS.get(name, name),
            "variant": name,
            "runtime": spec.runtime,
            "precision": spec.precision,
            "certified": policy_file is not None,
        }
        rows.append(row)
        status = runtime_status(spec)
        if status != "ok":
            row["status"] = status
            continue
        try:
            sess = open_session(bundle.path / fname, spec)
        except RuntimeUnavailable as e:
            row["status"] = str(e)
            continue
        row |= {
            "status": "ok" if policy_file else "ok, no certified policy (export.openvino=true)",
            "size_mb": (bundle.path / fname).stat().st_size / 2**20,
            "threads": sess.info.get("threads"),
        }
        if xl is not None:
            z = sess.logits(xl, batch_size=batch)
            policy = TrustPolicy.load(bundle.path / (policy_file or "policy.json"))
            _quality(row, z, policy, y)
            if name == "fp32":
                ref_logits = z
            elif ref_logits is not None:
                row["max_diff"] = float(np.abs(z - ref_logits).max())
        elif name in known and f"test_accuracy_{name}" in known[name]:  # recorded at export time
            row["accuracy"], row["ece"] = (
                known[name][f"test_accuracy_{name}"],
                known[name][f"test_ece_{name}"],
            )
            row["quality_source"] = "export"

        def run_onnx(sess: Any = sess.session) -> None:
            sess.run(None, {"input": x})

        cands.append(_Candidate(row, run_onnx))
    if "fp32" in [r.get("variant") for r in rows] and xl is None:
        fp = known.get("int8", {})
        if "test_accuracy_fp32" in fp:
            row0 = next(r for r in rows if r.get("variant") == "fp32")
            row0["accuracy"], row0["ece"], row0["quality_source"] = (
                fp["test_accuracy_fp32"],
                fp["test_ece_fp32"],
                "export",
            )

    for c in cands:  # warm-up: first runs allocate, compile kernels, fill caches
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
        c.row["img_s"] = c.best
        c.row["ms_img"] = 1000 / c.best

    from roadwork.export.variants import tensorrt_available

    rows.append(
        {
            "format": "TensorRT (ORT EP)",
            "variant": None,
            "status": "available" if tensorrt_available() else "needs an NVIDIA GPU + onnxruntime-gpu",
        }
    )
    base = torch_row.get("img_s")
    for r in rows:
        if "img_s" in r:
            r["speedup"] = r["img_s"] / base if base else None
    fp32 = next(r for r in rows if r.get("variant") == "fp32")
    if bundle.manifest.get("export", {}).get("parity_max_abs_diff") is not None:
        fp32["parity"] = bundle.manifest["export"]["parity_max_abs_diff"]
    for r in rows:
        if r.get("variant") and "accuracy" in r and "accuracy" in fp32:
            r["accuracy_change"] = r["accuracy"] - fp32["accuracy"]
            r["ece_change"] = r["ece"] - fp32["ece"]
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
        record = {
            "variant": chosen["variant"],
            "runtime": chosen["runtime"],
            "precision": chosen["precision"],
            "threads": threads,
            "batch": batch,
            "img_s": chosen["img_s"],
            "ms_img": chosen["ms_img"],
            "accuracy": chosen.get("accuracy"),
            "ece": chosen.get("ece"),
            "images": source,
            "budget": budget,
            "cpu": cpu_summary(),
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "measured": {r["variant"]: r["img_s"] for r in rows if r.get("variant") and "img_s" in r},
        }
        result.meta["recorded"] = str(record_runtime_choice(bundle.path, record))
    return result


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
        "| format | status | size MB | accuracy | Δ acc pt | ECE | Δ ECE | max Δ logit | ms/img | img/s "
        "| vs torch eager | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        change = r.get("accuracy_change")
        lines.append(
            f"| {'**' + r['format'] + '** ✓' if r.get('selected') else r['format']} | {r['status']} | "
            f"{f(r.get('size_mb'), '.2f')} | {f(r.get('accuracy'), '.4f')} | "
            f"{f(None if change is None else 100 * change, '+.2f')} | {f(r.get('ece'), '.4f')} | "
            f"{f(r.get('ece_change'), '+.4f')} | {f(r.get('max_diff'), '.1e')} | {f(r.get('ms_img'), '.2f')} | "
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
