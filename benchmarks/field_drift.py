"""Static vs online conformal on a drifting stream served by a bundle: coverage per window of labelled answers.

    python benchmarks/field_drift.py [--bundle runs/demo/export/bundle] [--n 12000] [--label-share 0.2] [--delay 200]

The stream: ``--n`` generated scenes (a seed the run never saw), the first half with the generator's usual mix,
the second half shifted: with probability ``--shift`` (0.75) a scene is set to fog or snow at night (about 15 %
night-and-fog before the shift). The bundle answers every scene (its whole served path: cascade, calibrator,
conformal sets, abstention). A uniform ``--label-share`` of answers is labelled back, ``--delay`` answers later.
Online control (``roadwork.field.online``, what the server's ``conformal_online=aci`` runs: the same
``OnlineControl.for_policy`` and ``shifted``) moves the sets' and the abstention's thresholds with each label as it
arrives; the static policy keeps the certified thresholds. Coverage is measured on the labelled answers, per window
of ``--window`` labels; the error on answered images on the labelled answered ones, per window and over the run.
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
from roadwork.field.online import OnlineControl, Outcome, shifted


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
    ap.add_argument("--n", type=int, default=12000)
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
    online = OnlineControl.for_policy(policy, eta=args.eta)
    rows = _serve(out, y, labelled, policy, online, args.delay)
    _report(rows, args, policy, online)


def _serve(out, y, labelled, policy, online, delay):  # type: ignore[no-untyped-def]
    """Each answer in serving order under the thresholds of its moment; labels arrive ``delay`` answers late."""
    rows = []  # per labelled answer: static covered, online covered, static answered/wrong, online answered/wrong
    pending: list[tuple[int, Outcome]] = []
    t_static = policy.abstention.threshold
    for k in range(len(y)):
        p = out.probs[k : k + 1]
        parts = shifted(policy, online)
        sets = parts["conformal"].predict_sets(p)[0]
        pred, conf = policy.decision(p)
        t = parts["abstention"].threshold if "abstention" in parts else t_static
        answered, wrong = bool(conf[0] >= t), bool(pred[0] != y[k])
        if labelled[k]:
            pending.append((k, Outcome(covered=bool(sets[y[k]]), answered=answered, wrong=wrong)))
            static_set = policy.conformal.predict_sets(p)[0]
            rows.append(
                (bool(static_set[y[k]]), bool(sets[y[k]]), bool(conf[0] >= t_static), answered, wrong)
            )
        while pending and pending[0][0] <= k - delay:  # labels arrive late, in order
            online.update([pending.pop(0)[1]])
    return np.array(rows, dtype=bool).reshape(-1, 5)


def _report(rows, args, policy, online) -> None:  # type: ignore[no-untyped-def]
    band, target = 0.025, 1 - policy.conformal.alpha
    r = policy.abstention.target_risk
    print(
        "| labels | static coverage | online coverage | static in band | online in band | static error on answered "
        "(answered) | online error on answered (answered) |"
    )
    print("|---|---:|---:|---|---|---:|---:|")
    static_out = online_out = 0

    def sel(w: np.ndarray, ans: int) -> str:
        a = w[:, ans]
        return f"{w[a, 4].mean():.3f} ({a.mean():.2f})" if a.any() else "- (0.00)"

    for w in range(0, len(rows), args.window):
        win = rows[w : w + args.window]
        s, o = win[:, 0].mean(), win[:, 1].mean()
        s_in, o_in = abs(s - target) <= band, abs(o - target) <= band
        if w >= args.window:  # after the first window
            static_out += not s_in
            online_out += not o_in
        print(
            f"| {w + 1}-{w + len(win)} | {s:.3f} | {o:.3f} | {'yes' if s_in else 'NO'} | {'yes' if o_in else 'NO'} "
            f"| {sel(win, 2)} | {sel(win, 3)} |"
        )
    st_risk = rows[rows[:, 2], 4].mean() if rows[:, 2].any() else float("nan")
    on_risk = rows[rows[:, 3], 4].mean() if rows[:, 3].any() else float("nan")
    print(
        f"\nafter the first window: static outside 1 - alpha ± {band} in {static_out} windows, online in "
        f"{online_out}; long-run online miscoverage {1 - rows[:, 1].mean():.4f} (deterministic bound on |mean - alpha| "
        f"with {args.delay} labels in flight: {online.bound('sets', delay=args.delay):.4f}).\n"
        f"long-run error on answered (labelled): static {st_risk:.4f} on {rows[:, 2].mean():.2f} answered, online "
        f"{on_risk:.4f} on {rows[:, 3].mean():.2f} answered; target {r} (acceptance: online <= {r + 0.01:.2f}; "
        f"deterministic bound {r + (online.bound('abstain', scale=1 - policy.abstention.threshold, delay=args.delay) or 0):.4f})"
    )


if __name__ == "__main__":
    main()
