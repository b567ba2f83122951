"""Static vs online conformal on a drifting stream served by a bundle: coverage per window of labelled answers.

    python benchmarks/field_drift.py [--bundle runs/demo/export/bundle] [--n 12000] [--label-share 0.2] [--delay 200]
        [--only drift,recertify,swap]

Three parts: drift (below), recertify (``--resplits`` re-splits of a stored pool of shifted scenes: the refitted
policy's coverage, error on answered and miss rate on the rows it was not fitted on) and swap
(``benchmarks/_field_swap.py``: a recertified version hot-loaded under 16 clients, then a tampered one).

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


def _stream(
    n: int, shift: float, size: int, seed: int, start: int | None = None
) -> tuple[list, list[int], list[str]]:  # type: ignore[type-arg]
    """``n`` scenes; from index ``start`` (default: half way) each is set to fog or snow at night w.p. ``shift``."""
    rng = np.random.default_rng([seed, 99])
    images, labels, kinds = [], [], []
    start = n // 2 if start is None else start
    for spec, img in iter_scenes(n, size=size, seed=seed):
        if spec.index >= start and rng.random() < shift:
            spec = dataclasses.replace(spec, weather=str(rng.choice(["fog", "snow"])), time="night")
            img = render_scene(spec, size, seed)
        images.append(img)
        labels.append(spec.true_label)
        kinds.append(f"{spec.weather}/{spec.time}")
    return images, labels, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/demo/export/bundle")
    ap.add_argument("--only", default="drift,recertify,swap", help="comma-separated: drift, recertify, swap")
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--shift", type=float, default=0.75)
    ap.add_argument("--label-share", type=float, default=0.2)
    ap.add_argument("--delay", type=int, default=200)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--eta", type=float, default=0.05)
    ap.add_argument("--pool", type=int, default=4000, help="recertify: the stored shifted pool's size")
    ap.add_argument("--resplits", type=int, default=300)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args()
    only = set(args.only.split(","))
    print("\n".join(machine_lines()))
    if "drift" in only:
        drift(args)
    if only & {"recertify", "swap"}:
        recertify_and_swap(args, only)


def drift(args: argparse.Namespace) -> None:
    bundle = Bundle.load(args.bundle)
    policy = bundle.policy
    t0 = time.perf_counter()
    images, labels, kinds = _stream(args.n, args.shift, 128, args.seed)
    out = bundle.predict_images(images)
    y = np.array(labels)
    night_bad = [("night" in k and k.split("/")[0] in ("fog", "snow")) for k in kinds]
    half = args.n // 2
    print(
        f"\n## Drift\n\n{args.n} scenes in {time.perf_counter() - t0:.0f} s; fog/snow at night: "
        f"{100 * np.mean(night_bad[:half]):.0f} % before the shift, {100 * np.mean(night_bad[half:]):.0f} % after; "
        f"alpha {policy.conformal.alpha}, selective target {policy.abstention.target_risk}, "
        f"{100 * args.label_share:.0f} % labelled back {args.delay} answers later, eta {args.eta}\n"
    )
    rng = np.random.default_rng([args.seed, 7])
    labelled = rng.random(args.n) < args.label_share
    online = OnlineControl.for_policy(policy, eta=args.eta)
    rows = _serve(out, y, labelled, policy, online, args.delay)
    _report(rows, args, policy, online)


def recertify_and_swap(args: argparse.Namespace, only: set[str]) -> None:
    """A stored pool of shifted scenes (every scene set to fog or snow at night w.p. ``--shift``) through the
    served path; recertify on 1,000 of them over ``--resplits`` re-splits; the hot swap of a version recertified
    on 1,000 of them written as JPEGs."""
    bundle = Bundle.load(args.bundle)
    images, labels, _kinds = _stream(args.pool, args.shift, 128, args.seed + 1, start=0)
    probs = bundle.predict_images(images).probs  # the stored pool: served, calibrated probabilities
    y = np.array(labels)
    if "recertify" in only:
        policy = bundle.policy
        if policy.risk_control is None and policy.positive_index is not None:
            # the demo policy has no miss-rate control: give it the one risk_control.enabled=true would fit
            # (alpha 0.05 on the positive class), on unshifted scenes through the same served path
            import dataclasses as dc

            from roadwork.trust.risk import FalseNegativeControl

            before, b_labels, _ = _stream(2000, 0.0, 128, args.seed + 2, start=10**9)
            fnr = FalseNegativeControl(alpha=0.05, positive=policy.positive_index).fit(
                bundle.predict_images(before).probs, np.array(b_labels)
            )
            policy = dc.replace(policy, risk_control=fnr)
            print(
                "\n(the demo policy has no risk_control: one at alpha 0.05 is fitted on 2,000 unshifted scenes)"
            )
        _resplits(policy, probs, y, args.resplits, args.seed)
    if "swap" in only:
        import tempfile

        from _field_swap import hot_swap

        folder = Path(tempfile.mkdtemp(prefix="roadwork-field-pool-"))
        paths = []
        for i, img in enumerate(images[:1000]):
            paths.append(folder / f"{i:05d}.jpg")
            img.save(paths[-1], quality=92)
        try:
            hot_swap(Path(args.bundle), paths, [bundle.classes[v] for v in y[:1000]])
        finally:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def _resplits(policy, probs, y, resplits, seed) -> None:  # type: ignore[no-untyped-def]
    from roadwork.field.recertify import check_figures, refit

    rng = np.random.default_rng([seed, 3])
    alpha, a = policy.conformal.alpha, policy.abstention
    old_cov, new_cov, new_risk, old_risk, answered, fnr_miss, old_miss, old_ans = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    for _ in range(resplits):
        idx = rng.permutation(len(y))
        fit, check = idx[:1000], idx[1000:]
        new = refit(policy, probs[fit], y[fit], {})
        f, o = (
            check_figures(new, probs[check], y[check], {}),
            check_figures(policy, probs[check], y[check], {}),
        )
        new_cov.append(f["coverage"])
        old_cov.append(o["coverage"])
        new_risk.append(f["selective_risk"])
        old_risk.append(o["selective_risk"])
        answered.append(f["answered"])
        fnr_miss.append(f.get("miss_rate"))
        old_miss.append(o.get("miss_rate"))
        old_ans.append(o["answered"])
    m = len(y) - 1000
    sd_cov = np.sqrt(alpha * (1 - alpha) / m + alpha * (1 - alpha) / 1001)  # check noise + calibration draw
    viol = np.mean([r is not None and r > a.target_risk for r in new_risk])
    old_viol = np.mean([r is not None and r > a.target_risk for r in old_risk])
    tol = 3 * np.sqrt(a.delta * (1 - a.delta) / resplits)
    print(
        f"\n## Recertify on 1,000 labelled shifted images ({resplits} re-splits of a stored pool of {len(y)}, "
        f"checked on the other {m})\n"
    )
    print(
        "| policy | mean coverage | coverage sd | target 1 - alpha | share of splits error on answered > target | "
        "mean answered | miss rate |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")

    def miss(v: list) -> str:  # type: ignore[type-arg]
        if v[0] is None:
            return "n/a (no risk_control)"
        target = policy.risk_control.alpha
        return (
            f"{np.mean(v):.4f} (target {target}; > target in {np.mean(np.array(v) > target):.3f} of splits)"
        )

    print(
        f"| certified (old) | {np.mean(old_cov):.4f} | {np.std(old_cov):.4f} | {1 - alpha:.2f} | {old_viol:.3f} | "
        f"{np.mean(old_ans):.3f} | {miss(old_miss)} |"
    )
    print(
        f"| recertified | {np.mean(new_cov):.4f} | {np.std(new_cov):.4f} | {1 - alpha:.2f} | {viol:.3f} "
        f"(delta {a.delta}) | {np.mean(answered):.3f} | {miss(fnr_miss)} |"
    )
    ok_cov = abs(np.mean(new_cov) - (1 - alpha)) <= 3 * sd_cov / np.sqrt(resplits) + 1 / 1001
    print(
        f"\nrecertified coverage within binomial tolerance of 1 - alpha (|mean - (1 - alpha)| <= 3 sd/sqrt(splits) "
        f"+ 1/(n+1)): {'yes' if ok_cov else 'NO'}; error on answered above target in {viol:.3f} of splits <= delta "
        f"+ 3 binomial sd = {a.delta + tol:.3f}: {'yes' if viol <= a.delta + tol else 'NO'}"
    )
    if fnr_miss[0] is not None:  # conformal risk control: E[miss rate] <= alpha over calibration draws
        sd = np.sqrt(
            policy.risk_control.alpha
            * (1 - policy.risk_control.alpha)
            / max(1, int((y == policy.risk_control.positive).sum()) - 500)
        )
        ok = np.mean(fnr_miss) <= policy.risk_control.alpha + 3 * sd / np.sqrt(resplits) + 1 / 500
        print(f"recertified mean miss rate within tolerance of its target: {'yes' if ok else 'NO'}")


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
        full = len(win) == args.window  # a last partial window is shown, not judged
        if w >= args.window and full:  # after the first window
            static_out += not s_in
            online_out += not o_in
        print(
            f"| {w + 1}-{w + len(win)}{'' if full else ' (partial)'} | {s:.3f} | {o:.3f} | {'yes' if s_in else 'NO'} | {'yes' if o_in else 'NO'} "
            f"| {sel(win, 2)} | {sel(win, 3)} |"
        )
    st_risk = rows[rows[:, 2], 4].mean() if rows[:, 2].any() else float("nan")
    on_risk = rows[rows[:, 3], 4].mean() if rows[:, 3].any() else float("nan")
    print(
        f"\nafter the first window (full windows): static outside 1 - alpha ± {band} in {static_out} windows, online in "
        f"{online_out}; long-run online miscoverage {1 - rows[:, 1].mean():.4f} (deterministic bound on |mean - alpha| "
        f"with {args.delay} labels in flight: {online.bound('sets', delay=args.delay):.4f}).\n"
        f"long-run error on answered (labelled): static {st_risk:.4f} on {rows[:, 2].mean():.2f} answered, online "
        f"{on_risk:.4f} on {rows[:, 3].mean():.2f} answered; target {r} (acceptance: online <= {r + 0.01:.2f}; "
        f"deterministic bound {r + (online.bound('abstain', scale=1 - policy.abstention.threshold, delay=args.delay) or 0):.4f})"
    )


if __name__ == "__main__":
    main()
