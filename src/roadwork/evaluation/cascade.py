"""The cascade's part of ``metrics.json`` and the report: accuracy and cost against the largest stage alone,
the share of images each stage answers (overall and per slice), and the cost–accuracy curve over gates."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from roadwork.trust import metrics as M
from roadwork.trust.policy import PolicyOutput, TrustPolicy
from roadwork.trust.predictions import Predictions

__all__ = ["cascade_metrics", "cascade_png", "cascade_section"]


def cascade_metrics(
    policy: TrustPolicy,
    stage_logits: Sequence[np.ndarray],
    test: Predictions,
    curves: dict[str, Any],
    *,
    served: PolicyOutput | None = None,
) -> tuple[dict[str, Any], PolicyOutput]:
    """The cascade's figures on the test split: from ``served`` (the bundle's own outputs) when given, else by
    running the cascade on stored per-stage logits (the last stage's are ``test.logits``); ``stage_logits`` give
    each stage's accuracy alone."""
    c = policy.cascade
    assert c is not None
    out = (
        policy.apply_cascade(lambda s, rows: stage_logits[s][rows], len(test), test.slices)
        if served is None
        else served
    )
    alone = policy.apply(test.logits, test.slices)
    y = test.labels
    assert out.stage is not None
    n_stages = len(c.stages)
    share = np.bincount(out.stage, minlength=n_stages) / max(len(y), 1)
    mean_cost = c.expected_cost(out.stage)
    largest_cost = c.stages[-1].cost_ms
    stages = []
    for s, st in enumerate(c.stages):
        answered = out.stage == s
        k = len(policy.classes)
        p_alone = (
            alone.probs if s == n_stages - 1 else st.calibrator.predict_proba(stage_logits[s][:, :k])  # type: ignore[union-attr]
        )
        stages.append(
            {
                "name": st.name,
                "kind": st.kind,
                "cost_ms": st.cost_ms,
                "flops": st.flops,
                "share": float(share[s]),
                "accuracy_alone": M.accuracy(p_alone, y),
                "accuracy_answered": float((out.pred[answered] == y[answered]).mean())
                if answered.any()
                else None,
                **{
                    k: v
                    for k, v in st.info.items()
                    if k
                    in ("framework", "backbone", "image_size", "trees", "gatekeeper", "gate", "deferral_cost")
                },
            }
        )
    per_slice: dict[str, dict[str, Any]] = {}
    for col, values in sorted(test.slices.items()):
        for v in sorted(set(values.tolist()), key=str):
            m = values == v
            if m.sum() == 0:
                continue
            sh = np.bincount(out.stage[m], minlength=n_stages) / m.sum()
            per_slice[f"{col}={v}"] = {
                "n": int(m.sum()),
                "share": {st.name: float(x) for st, x in zip(c.stages, sh, strict=True)},
                "accuracy": float((out.pred[m] == y[m]).mean()),
                "mean_cost_ms": c.expected_cost(out.stage[m]),
            }
    wrong = out.pred != y
    risk = wrong & (alone.pred == y) if c.mode == "match" else wrong
    metrics = {
        "stages": stages,
        "accuracy": M.accuracy(out.probs, y),
        "largest_stage_accuracy": M.accuracy(alone.probs, y),
        "mean_cost_ms": mean_cost,
        "largest_stage_cost_ms": largest_cost,
        "cost_ratio": mean_cost / largest_cost if largest_cost > 0 else None,
        "stage_share": {st.name: float(x) for st, x in zip(c.stages, share, strict=True)},
        "threshold": c.threshold,
        "mode": c.mode,
        "target": c.target,
        "delta": c.delta,
        "certified": c.certified,
        "calib_risk": c.calib_risk,
        "test_risk": float(risk.mean()),
        "coverage": float(out.sets[np.arange(len(y)), y].mean()),
        "mean_set_size": float(out.sets.sum(axis=1).mean()),
        "abstain_rate": float(out.abstain.mean()),
        "slices": per_slice,
        "curve_test": curves.get("test", {}),
    }
    return metrics, out


def _gate(threshold: float | None) -> str:
    """The gate for a reader: unbounded (null in JSON, +inf in memory) means no early exit."""
    if threshold is None or not np.isfinite(threshold):
        return "∞ (no early exit)"
    return f"{threshold:.4f}"


def cascade_png(metrics: dict[str, Any]) -> bytes:
    """Cost–accuracy curve over gate thresholds on test, with the stages alone and the certified gate."""
    from roadwork.evaluation.plots import _plt, _png

    plt = _plt()
    cur = metrics["curve_test"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        cur["cost_ms"], cur["accuracy"], "-", color="tab:blue", lw=1.5, label="cascade, gate threshold swept"
    )
    for st in metrics["stages"]:
        ax.plot(st["cost_ms"], st["accuracy_alone"], "s", ms=6, label=f"{st['name']} alone")
    ax.plot(
        metrics["mean_cost_ms"],
        metrics["accuracy"],
        "*",
        color="tab:red",
        ms=14,
        label="certified operating point",
    )
    ax.set_xlabel("mean cost (ms per image)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def cascade_section(metrics: dict[str, Any], table: Any, img: Any) -> list[str]:
    """HTML for the report (``table``/``img``: the report's helpers)."""
    c = metrics["cascade"]
    ratio = c["cost_ratio"]
    what = (
        f"the rate of images the cascade gets wrong while the last stage alone gets right is at most {c['target']}"
        if c["mode"] == "match"
        else f"the cascade's error rate is at most {c['target']}"
    )
    parts = [
        "<h2>Cascade</h2>",
        f"<p>Earlier stages answer an image when their calibrated confidence is at least "
        f"<b>{_gate(c['threshold'])}</b>; the rest go on. Certified on the calibration split: with probability ≥ "
        f"{1 - c['delta']:.0%}, {html.escape(what)} ({'certified' if c['certified'] else 'NOT certified: everything goes to the last stage'}; "
        f"test: {c['test_risk']:.4f}). Accuracy {c['accuracy']:.4f} vs {c['largest_stage_accuracy']:.4f} for the "
        f"last stage alone, at {c['mean_cost_ms']:.3f} vs {c['largest_stage_cost_ms']:.3f} ms per image"
        + (f" (<b>{ratio:.0%}</b> of the cost)." if ratio is not None else ".")
        + "</p>",
        table(
            ["stage", "kind", "ms/img", "GFLOPs", "answers", "accuracy alone", "accuracy on answered"],
            [
                [
                    s["name"],
                    s["kind"],
                    s["cost_ms"],
                    "" if s["flops"] is None else s["flops"] / 1e9,
                    f"{s['share']:.1%}",
                    s["accuracy_alone"],
                    "" if s["accuracy_answered"] is None else s["accuracy_answered"],
                ]
                for s in c["stages"]
            ],
        ),
        img("cascade", cascade_png(c), "Cascade cost vs accuracy on test"),
        "<p>Share of images answered by each stage, per slice (hard slices should go further down):</p>",
    ]
    for s in c["stages"]:
        gk = s.get("gatekeeper")
        if gk:
            parts.append(
                f"<p>Gatekeeper fine-tuning of <b>{html.escape(s['name'])}</b> (α={gk['alpha']}): deferral quality "
                "on the calibration split before → after (AUROC of confidence for a right answer: higher is "
                "better; area under the risk–coverage curve: lower is better).</p>"
            )
            parts.append(
                table(
                    ["", "accuracy", "deferral AUROC", "AURC"],
                    [[k, gk[k]["accuracy"], gk[k]["auroc"], gk[k]["aurc"]] for k in ("before", "after")],
                )
            )
    if c.get("candidates"):
        parts.append(
            "<p>Which earlier stages to keep: every subset was certified at δ/m (m subsets; together they hold "
            "with probability ≥ 1−δ) and the cheapest on the calibration split was kept (shaded).</p>"
        )
        parts.append(
            table(
                ["stages", "gate", "certified", "mean ms/img (calibration)"],
                [
                    [
                        " → ".join(r["stages"]),
                        r["threshold"],
                        "yes" if r["certified"] else "no",
                        r["calib_cost_ms"],
                    ]
                    for r in c["candidates"]
                ],
                ["ok" if r.get("chosen") else "" for r in c["candidates"]],
            )
        )
    names = [s["name"] for s in c["stages"]]
    parts.append(
        table(
            ["slice", "n", *names, "accuracy", "ms/img"],
            [
                [k, r["n"], *[f"{r['share'][n]:.1%}" for n in names], r["accuracy"], r["mean_cost_ms"]]
                for k, r in c["slices"].items()
            ],
        )
    )
    return parts
