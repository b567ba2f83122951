"""Static vs online conformal on a drifting stream served by a bundle: coverage per window of labelled answers.

    python benchmarks/field_drift.py [--bundle runs/demo/export/bundle] [--n 6000] [--label-share 0.2] [--delay 200]

The stream: ``--n`` generated scenes (a seed the run never saw), the first half with the generator's usual mix,
the second half shifted: with probability ``--shift`` (0.75) a scene is set to fog or snow at night (about 15 %
night-and-fog before the shift). The bundle answers every scene (its whole served path: cascade, calibrator,
conformal sets, abstention). A uniform ``--label-share`` of answers is labelled back, ``--delay`` answers later.
Online conformal (``roadwork.field.online``, the server's ``conformal_online=aci``) moves the set threshold with
each label as it arrives; the static policy keeps the certified threshold. Coverage and selective risk are
measured on the labelled answers, per window of ``--window`` labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_lines

from roadwork.data.synthetic import iter_scenes, render_scene
from roadwork.export.bundle import Bundle
from roadwork.field.online import OnlineConformal, shifted


def _stream(n: int, shift: float, size: int, seed: int) -> tuple[list, list[int], list[str]]:  # type: ignore[type-arg]
    rng = np.random.default_rng([seed, 99])
    images, labels, kinds = [], [], []
    for spec, img in iter_scenes(n, size=size, seed=seed):
        if spec.index >= n // 2 and rng.random() < shift:
            spec = dataclasses.replace(spec, weather=str(rng.choice(["fog", "snow"])), time="night")
            img = render_scene(spec, size, seed)
        images.append(img)
        labels.append(spec.true_label)
        kinds.append(f"{spec.weather}/{spec.time}")
    return images, labels, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/export/bundle")
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--shift", type=float, default=0.75)
    ap.add_argument("--label-share", type=float, default=0.2)
    ap.add_argument("--delay", type=int, default=200)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--eta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args()
    bundle = Bundle.load(args.bundle)
    policy = bundle.policy
    print("\n".join(machine_lines()))
    t0 = time.perf_counter()
    images, labels, kinds = _stream(args.n, args.shift, 128, args.seed)
    out = bundle.predict_images(images)
    y = np.array(labels)
    night_bad = [("night" in k and k.split("/")[0] in ("fog", "snow")) for k in kinds]
    half = args.n // 2
    print(
        f"\n{args.n} scenes in {time.perf_counter() - t0:.0f} s; fog/snow at night: "
        f"{100 * np.mean(night_bad[:half]):.0f} % before the shift, {100 * np.mean(night_bad[half:]):.0f} % after; "
        f"alpha {policy.conformal.alpha}, selective target {policy.abstention.target_risk}, "
        f"{100 * args.label_share:.0f} % labelled back {args.delay} answers later, eta {args.eta}\n"
    )
    rng = np.random.default_rng([args.seed, 7])
    labelled = rng.random(args.n) < args.label_share
    online = OnlineConformal(alpha=policy.conformal.alpha, eta=args.eta)
    base = policy.conformal
    static_cov, online_cov, static_risk = [], [], []
    pending: list[tuple[int, bool]] = []
    for k in range(args.n):  # in serving order; each answer uses the threshold of its moment
        p = out.probs[k : k + 1]
        served = shifted(base, online).predict_sets(p)[0]
        static = base.predict_sets(p)[0]
        if labelled[k]:
            pending.append((k, not served[y[k]]))
            static_cov.append(bool(static[y[k]]))
            online_cov.append(bool(served[y[k]]))
            if not out.abstain[k]:
                static_risk.append(bool(out.pred[k] != y[k]))
        while pending and pending[0][0] <= k - args.delay:  # labels arrive late, in order
            online.update([("all", pending.pop(0)[1])])
    band = 0.025
    target = 1 - policy.conformal.alpha
    print("| labels | static coverage | online coverage | static in band | online in band |")
    print("|---|---:|---:|---|---|")
    static_out = online_out = 0
    for w in range(0, len(static_cov), args.window):
        s, o = np.mean(static_cov[w : w + args.window]), np.mean(online_cov[w : w + args.window])
        s_in, o_in = abs(s - target) <= band, abs(o - target) <= band
        if w >= args.window:  # after the first window
            static_out += not s_in
            online_out += not o_in
        print(
            f"| {w + 1}-{min(w + args.window, len(static_cov))} | {s:.3f} | {o:.3f} | {'yes' if s_in else 'NO'} | "
            f"{'yes' if o_in else 'NO'} |"
        )
    print(
        f"\nafter the first window: static outside 1 - alpha ± {band} in {static_out} windows, online in "
        f"{online_out}; long-run online miscoverage {1 - np.mean(online_cov):.4f} (bound on |mean - alpha| after "
        f"{online.labelled.get('all', 0)} updates: {online.bound('all'):.4f}); selective risk of the static "
        f"abstention on labelled answers {np.mean(static_risk):.4f} (target {policy.abstention.target_risk}; "
        "online abstention control is not built)"
    )


if __name__ == "__main__":
    main()
