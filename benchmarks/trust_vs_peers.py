"""roadwork's conformal sets vs MAPIE on the same probabilities, one table.

    pip install 'roadwork[bench]'        # MAPIE, netcal and numba
    python benchmarks/trust_vs_peers.py [--k 1000] [--n 20000] [--n-temp 100000]

Synthetic logits of a K-class model that is right about 75 % of the time; calibration and test rows are
drawn from the same model. Every method sees identical probabilities. Prints two tables: conformal sets
(method, coverage, mean set size, fit ms, predict rows/s, and roadwork's rows/s over the peer's; MAPIE's
APS/RAPS are its defaults, randomised calibration and include_last_label=True predictions, which is what
roadwork's deterministic mode computes; predictions are the best of --repeats calls (default 5) for every method,
after one untimed roadwork call that loads or compiles its numba kernels, once per process), and temperature
scaling fitted on --n-temp rows of K-class logits
(temperature, fit ms, netcal's fit time over ours). netcal takes probabilities, so it gets softmax(logits).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from roadwork.trust import SplitConformal, softmax


def _task(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    z = rng.normal(0, 1, size=(n, k))
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += rng.normal(4.5, 1.5, n)  # a true-class bump: top-1 accuracy around 75 %
    return softmax(z), y


class _Prefit:
    """A 'fitted' sklearn classifier whose predict_proba returns stored probabilities; X holds row indices."""

    _estimator_type = "classifier"

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])
        self.n_features_in_ = 1

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Prefit:
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.probs[np.asarray(x).ravel().astype(int)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)

    def get_params(self, deep: bool = True) -> dict[str, object]:
        return {}


def _time(fn, repeat: int = 1) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--n", type=int, default=20000, help="calibration rows, and as many test rows")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--n-temp", type=int, default=100000, help="rows for the temperature-scaling fit")
    ap.add_argument("--repeats", type=int, default=5, help="predict calls per method; the best is reported")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p, y = _task(2 * args.n, args.k, rng)
    pc, yc, pt, yt = p[: args.n], y[: args.n], p[args.n :], y[args.n :]
    rows = []

    def ours(score: str) -> tuple[float, float, float, float]:
        conf = SplitConformal(alpha=args.alpha, score=score, k_reg=1, lam=0.01)  # type: ignore[arg-type]
        fit_s, _ = _time(lambda: conf.fit(pc, yc))
        conf.predict_sets(pt)  # loads (or compiles, the first time) the numba kernels
        pred_s, sets = _time(lambda: conf.predict_sets(pt), repeat=args.repeats)
        assert isinstance(sets, np.ndarray)
        return sets[np.arange(len(yt)), yt].mean(), sets.sum(1).mean(), fit_s * 1e3, len(yt) / pred_s

    t0 = time.perf_counter()
    bare_q = float(
        np.quantile(
            1 - pc[np.arange(args.n), yc], np.ceil((args.n + 1) * (1 - args.alpha)) / args.n, method="higher"
        )
    )
    bare_s, bare = _time(lambda: pt >= 1 - bare_q, repeat=args.repeats)
    assert isinstance(bare, np.ndarray)
    rows.append(
        (
            "bare numpy LAC (p >= 1-q)",
            bare[np.arange(len(yt)), yt].mean(),
            bare.sum(1).mean(),
            (time.perf_counter() - t0 - bare_s) * 1e3,
            len(yt) / bare_s,
            None,
        )
    )
    for score in ("lac", "aps", "raps"):
        rows.append((f"roadwork {score}", *ours(score), None))
    try:
        from mapie.classification import SplitConformalClassifier
    except ImportError:
        print("MAPIE is not installed (pip install 'roadwork[bench]'): its rows are skipped.")
    else:
        xc, xt = np.arange(args.n)[:, None], np.arange(args.n, 2 * args.n)[:, None]
        for score in ("lac", "aps", "raps"):
            kw = {"conformity_score": score} if score != "raps" else {}
            if score == "raps":
                from mapie.conformity_scores import RAPSConformityScore

                kw = {"conformity_score": RAPSConformityScore(size_raps=0.2)}
            m = SplitConformalClassifier(_Prefit(p), confidence_level=1 - args.alpha, prefit=True, **kw)
            try:
                fit_s, _ = _time(lambda m=m: m.conformalize(xc, yc))
                pred_s, out = _time(lambda m=m: m.predict_set(xt), repeat=args.repeats)
            except Exception as e:  # report, don't crash: the table still shows our rows
                rows.append(
                    (f"MAPIE {score}", float("nan"), float("nan"), float("nan"), float("nan"), str(e)[:60])
                )
                continue
            sets = np.asarray(out[1])[:, :, 0]
            ours_rps = next(r[4] for r in rows if r[0] == f"roadwork {score}")
            rows.append(
                (
                    f"MAPIE {score}",
                    sets[np.arange(len(yt)), yt].mean(),
                    sets.sum(1).mean(),
                    fit_s * 1e3,
                    len(yt) / pred_s,
                    f"roadwork is {ours_rps / (len(yt) / pred_s):.1f}x",
                )
            )
    print(f"K={args.k}, {args.n} calibration + {args.n} test rows, alpha={args.alpha}\n")
    print("| method | coverage | mean set size | fit ms | predict rows/s | ratio |")
    print("|---|---:|---:|---:|---:|---|")
    for name, cov, size, fit_ms, rps, note in rows:
        print(f"| {name} | {cov:.4f} | {size:.2f} | {fit_ms:.1f} | {rps:,.0f} | {note or ''} |")
    _temperature_table(args.n_temp, args.k)


def _temperature_table(n: int, k: int) -> None:
    from roadwork.trust.calibration import TemperatureScaler

    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, size=(n, k))
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += rng.normal(4.5, 1.5, n)
    z *= 1.7  # mis-scaled logits, so the fitted temperature is not 1
    ours_s, ours = _time(lambda: TemperatureScaler().fit(z, y))
    rows = [("roadwork temperature (Newton on 1/T)", ours.temperature_, ours_s * 1e3, "")]  # type: ignore[union-attr]
    try:
        from netcal.scaling import TemperatureScaling
    except ImportError:
        print("netcal is not installed (pip install 'roadwork[bench]'): its row is skipped.")
    else:
        p = softmax(z)
        nc = TemperatureScaling()
        nc_s, _ = _time(lambda: nc.fit(p, y))
        rows.append(
            (
                "netcal TemperatureScaling (mle)",
                1.0 / float(nc.temperature[0]),
                nc_s * 1e3,
                f"roadwork is {nc_s / ours_s:.1f}x",
            )
        )
    print(f"\nTemperature scaling, {n} x {k} logits\n")
    print("| method | temperature | fit ms | ratio |")
    print("|---|---:|---:|---|")
    for name, t, ms, note in rows:
        print(f"| {name} | {t:.6f} | {ms:,.0f} | {note} |")


if __name__ == "__main__":
    main()
