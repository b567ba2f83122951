"""Every runtime × precision of roadwork's runtime layer on two models, side by side in one interleaved run.

    .venv/bin/python benchmarks/runtimes.py [--rounds 5] [--seconds 2] [--batch 8] [--threads 0]
    .venv/bin/python benchmarks/runtimes.py --bundle runs/vit-runtimes/export/bundle [--select]

With ``--bundle`` (one or more): ``roadwork bench``'s table for trained bundles instead — accuracy and ECE on
the run's test split through each variant's own policy, the selected variant. The trained ViT bundle comes from
``roadwork run benchmarks/runtimes_vit.yaml`` (ViT-S/14 @ 224, random init, linear probe on generated scenes).

ViT-S/14 at 224 px (timm ``vit_small_patch14_dinov2``, random weights, ``img_size=224``) and the demo's CNN
(``resnet10t`` with the demo's widths at 96 px). Each model is exported by roadwork's own exporter, then run by
torch eager, ONNX Runtime fp32 and static int8 (QDQ calibrated on 64 random inputs), OpenVINO fp32 and bf16
(bf16 only where the CPU has AVX-512 BF16 or AMX) and OpenVINO int8 (NNCF post-training quantisation on the
same 64 inputs). Random weights have no accuracy, so the quality columns are
top-1 agreement with ONNX Runtime fp32 and the max |logit difference| on 64 held-out inputs (the bundle's
``roadwork bench`` scores accuracy and ECE on labelled images). Speed: best of N rounds after a warm-up, every
variant once per round. The machine's CPU model and flags are printed first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_lines


def _models():  # type: ignore[no-untyped-def]
    import timm

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=2)
    cnn = timm.create_model(
        "resnet10t", pretrained=False, num_classes=2, channels=[48, 64, 96, 128], stem_width=16
    )
    return [("ViT-S/14 @ 224", vit.eval(), 224), ("demo CNN (resnet10t) @ 96", cnn.eval(), 96)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="per variant per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--bundle", nargs="*", default=[], help="trained bundles: roadwork bench's table for each"
    )
    ap.add_argument(
        "--select", action="store_true", help="with --bundle: record the selection (runtime.json)"
    )
    args = ap.parse_args()
    if args.bundle:
        from roadwork.export.bench import bench_bundle, format_table

        for b in args.bundle:
            rows = bench_bundle(
                b,
                batch=args.batch,
                seconds=args.seconds * args.rounds,
                rounds=args.rounds,
                threads=args.threads,
                select=args.select,
            )
            print(f"### {b}\n\n{format_table(rows)}\n")
        return
    import torch

    from roadwork.export.onnx import export_onnx
    from roadwork.export.runtime import RuntimeSpec, open_session, runtime_status
    from roadwork.export.variants import quantize_int8, quantize_openvino_int8

    print("\n".join(machine_lines()))
    print(
        f"batch {args.batch}, best of {args.rounds} interleaved rounds of {args.seconds:g} s after warm-up, "
        f"threads {args.threads or 'default'}; torch {torch.__version__}\n"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    for title, model, size in _models():
        x = rng.normal(size=(args.batch, 3, size, size)).astype(np.float32)
        held = rng.normal(size=(64, 3, size, size)).astype(np.float32)
        onnx = tmp / f"{size}.onnx"
        export_onnx(model, held[:4], onnx)
        q = tmp / f"{size}-int8.onnx"
        quantize_int8(
            onnx, q, mode="static", calibration=rng.normal(size=(64, 3, size, size)).astype(np.float32)
        )
        ov_q = tmp / f"{size}-ov-int8.xml"
        if runtime_status(RuntimeSpec("openvino", "int8")) == "ok":
            quantize_openvino_int8(
                onnx, ov_q, calibration=rng.normal(size=(64, 3, size, size)).astype(np.float32)
            )
        xt = torch.from_numpy(x)

        def run_torch(model=model, xt=xt) -> None:  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                model(xt)

        variants: list[tuple[str, object, str]] = [("torch eager", run_torch, "ok")]
        quality: dict[str, tuple[float, float]] = {}
        ref = None
        for name, spec, path in [
            ("ONNX Runtime fp32", RuntimeSpec(threads=args.threads), onnx),
            ("ONNX Runtime int8 (static QDQ)", RuntimeSpec("onnxruntime", "int8", threads=args.threads), q),
            ("OpenVINO fp32", RuntimeSpec("openvino", "fp32", threads=args.threads), onnx),
            ("OpenVINO bf16", RuntimeSpec("openvino", "bf16", threads=args.threads), onnx),
            ("OpenVINO int8 (NNCF)", RuntimeSpec("openvino", "int8", threads=args.threads), ov_q),
        ]:
            status = runtime_status(spec)
            if status != "ok":
                variants.append((name, None, status))
                continue
            sess = open_session(path, spec)
            z = sess.logits(held, batch_size=args.batch)
            if ref is None:
                ref = z
            quality[name] = (float((z.argmax(1) == ref.argmax(1)).mean()), float(np.abs(z - ref).max()))

            def run(s=sess.session, x=x) -> None:  # type: ignore[no-untyped-def]
                s.run(None, {"input": x})

            variants.append((name, run, "ok"))
        best = {n: 0.0 for n, r, _ in variants if r is not None}
        for _, r, _ in variants:
            if r is not None:
                r()  # type: ignore[operator]
                r()  # type: ignore[operator]
        for _ in range(args.rounds):
            for n, r, _ in variants:
                if r is None:
                    continue
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds or done == 0:
                    r()  # type: ignore[operator]
                    done += args.batch
                best[n] = max(best[n], done / (time.perf_counter() - t0))
        eager, fp32 = best["torch eager"], best["ONNX Runtime fp32"]
        print(f"### {title}\n")
        print(
            "| runtime × precision | status | top-1 agree vs ORT fp32 | max Δ logit | ms/img | img/s "
            "| vs torch eager | vs ORT fp32 |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for n, _, status in variants:
            if n not in best:
                print(f"| {n} | {status} | – | – | – | – | – | – |")
                continue
            agree, diff = quality.get(n, (None, None))
            a = "–" if agree is None else f"{100 * agree:.1f} %"
            d = "–" if diff is None else f"{diff:.1e}"
            v = best[n]
            print(
                f"| {n} | {status} | {a} | {d} | {1000 / v:.2f} | {v:.1f} | {v / eager:.2f}x | {v / fp32:.2f}x |"
            )
        print()


if __name__ == "__main__":
    main()
