"""The cascade's part of ``metrics.json`` and the report: accuracy and cost against the largest stage alone,
the share of images each stage answers (overall and per slice), and the cost–accuracy curve over gates."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from roadwork.trust import metrics as M
from roadwork.trust.cascade import Cascade
from roadwork.trust.policy import PolicyOutput, TrustPolicy
from roadwork.trust.predictions import Predictions

__all__ = ["cascade_metrics", "cascade_png", "cascade_section"]

# the stage facts from the cascade_models stage that the report shows
_STAGE_INFO = ("framework", "backbone", "image_size", "trees", "gatekeeper", "gate", "deferral_cost")


def _stage_rows(
    policy: TrustPolicy,
    out: PolicyOutput,
    alone: PolicyOutput,
    stage_logits: Sequence[np.ndarray],
    y: np.ndarray,
) -> list[dict[str, Any]]:
    """Per stage: cost, share of the images it answers, accuracy alone and on the images it answered."""
    c = policy.cascade
    assert c is not None and out.stage is not None
    n_stages, k = len(c.stages), len(policy.classes)
    share = np.bincount(out.stage, minlength=n_stages) / max(len(y), 1)
    rows = []
    for s, st in enumerate(c.stages):
        answered = out.stage == s
        last = s == n_stages - 1
        p_alone = alone.probs if last else st.calibrator.predict_proba(stage_logits[s][:, :k])  # type: ignore[union-attr]
        on_answered = float((out.pred[answered] == y[answered]).mean()) if answered.any() else None
        rows.append(
            {
                "name": st.name,
                "kind": st.kind,
                "cost_ms": st.cost_ms,
                "flops": st.flops,
                "share": float(share[s]),
                "accuracy_alone": M.accuracy(p_alone, y),
                "accuracy_answered": on_answered,
                **{key: v for key, v in st.info.items() if key in _STAGE_INFO},
            }
        )
    return rows


def _slice_rows(c: Cascade, out: PolicyOutput, test: Predictions) -> dict[str, dict[str, Any]]:
    """Per slice value (``weather=fog``): how many images, each stage's share, accuracy and mean cost."""
    assert out.stage is not None
    per_slice: dict[str, dict[str, Any]] = {}
    for col, values in sorted(test.slices.items()):
        for v in sorted(set(values.tolist()), key=str):
            m = values == v
            if m.sum() == 0:
                continue
            sh = np.bincount(out.stage[m], minlength=len(c.stages)) / m.sum()
            per_slice[f"{col}={v}"] = {
                "n": int(m.sum()),
                "share": {st.name: float(x) for st, x in zip(c.stages, sh, strict=True)},
                "accuracy": float((out.pred[m] == test.labels[m]).mean()),
                "mean_cost_ms": c.expected_cost(out.stage[m]),
            }
    return per_slice


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
    out = served
    if out is None:
        out = policy.apply_cascade(lambda s, rows: stage_logits[s][rows], len(test), test.slices)
    assert out.stage is not None
    alone = policy.apply(test.logits, test.slices)
    y = test.labels
    share = np.bincount(out.stage, minlength=len(c.stages)) / max(len(y), 1)
    mean_cost, largest_cost = c.expected_cost(out.stage), c.stages[-1].cost_ms
    wrong = out.pred != y
    risk = wrong & (alone.pred == y) if c.mode == "match" else wrong  # what the gate's certificate bounds
    metrics = {
        "stages": _stage_rows(policy, out, alone, stage_logits, y),
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
        "slices": _slice_rows(c, out, test),
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


Table = Callable[..., str]  # the report's table helper: table(header, rows, row_classes=None)


def _summary(c: dict[str, Any]) -> str:
    """The paragraph: the gate, what is certified, and accuracy and cost against the last stage alone."""
    ratio = c["cost_ratio"]
    what = (
        f"the rate of images the cascade gets wrong while the last stage alone gets right is at most {c['target']}"
        if c["mode"] == "match"
        else f"the cascade's error rate is at most {c['target']}"
    )
    verdict = "certified" if c["certified"] else "NOT certified: everything goes to the last stage"
    return (
        f"<p>Earlier stages answer an image when their calibrated confidence is at least "
        f"<b>{_gate(c['threshold'])}</b>; the rest go on. Certified on the calibration split: with probability ≥ "
        f"{1 - c['delta']:.0%}, {html.escape(what)} ({verdict}; "
        f"test: {c['test_risk']:.4f}). Accuracy {c['accuracy']:.4f} vs {c['largest_stage_accuracy']:.4f} for the "
        f"last stage alone, at {c['mean_cost_ms']:.3f} vs {c['largest_stage_cost_ms']:.3f} ms per image"
        + (f" (<b>{ratio:.0%}</b> of the cost)." if ratio is not None else ".")
        + "</p>"
    )


def _stages_table(c: dict[str, Any], table: Table) -> str:
    header = ["stage", "kind", "ms/img", "GFLOPs", "answers", "accuracy alone", "accuracy on answered"]
    rows = [
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
    ]
    return table(header, rows)


def _gatekeeper_parts(c: dict[str, Any], table: Table) -> list[str]:
    """Per Gatekeeper-tuned stage: its deferral quality before and after the fine-tuning."""
    parts = []
    for s in c["stages"]:
        gk = s.get("gatekeeper")
        if gk:
            parts.append(
                f"<p>Gatekeeper fine-tuning of <b>{html.escape(s['name'])}</b> (α={gk['alpha']}): deferral quality "
                "on the calibration split before → after (AUROC of confidence for a right answer: higher is "
                "better; area under the risk–coverage curve: lower is better).</p>"
            )
            rows = [[k, gk[k]["accuracy"], gk[k]["auroc"], gk[k]["aurc"]] for k in ("before", "after")]
            parts.append(table(["", "accuracy", "deferral AUROC", "AURC"], rows))
    return parts


def _candidates_parts(c: dict[str, Any], table: Table) -> list[str]:
    """The subsets of earlier stages the gate was certified for, the kept one shaded."""
    if not c.get("candidates"):
        return []
    rows = [
        [" → ".join(r["stages"]), r["threshold"], "yes" if r["certified"] else "no", r["calib_cost_ms"]]
        for r in c["candidates"]
    ]
    return [
        "<p>Which earlier stages to keep: every subset was certified at δ/m (m subsets; together they hold "
        "with probability ≥ 1−δ) and the cheapest on the calibration split was kept (shaded).</p>",
        table(
            ["stages", "gate", "certified", "mean ms/img (calibration)"],
            rows,
            ["ok" if r.get("chosen") else "" for r in c["candidates"]],
        ),
    ]


def _slices_parts(c: dict[str, Any], table: Table) -> list[str]:
    names = [s["name"] for s in c["stages"]]
    rows = [
        [k, r["n"], *[f"{r['share'][n]:.1%}" for n in names], r["accuracy"], r["mean_cost_ms"]]
        for k, r in c["slices"].items()
    ]
    return [
        "<p>Share of images answered by each stage, per slice (hard slices should go further down):</p>",
        table(["slice", "n", *names, "accuracy", "ms/img"], rows),
    ]


def cascade_section(
    metrics: dict[str, Any], table: Table, img: Callable[[str, bytes, str], str]
) -> list[str]:
    """HTML for the report (``table``/``img``: the report's helpers): the summary, the stages, the cost–accuracy
    curve, Gatekeeper tuning, the candidate subsets and the per-slice shares."""
    c = metrics["cascade"]
    return [
        "<h2>Cascade</h2>",
        _summary(c),
        _stages_table(c, table),
        img("cascade", cascade_png(c), "Cascade cost vs accuracy on test"),
        *_gatekeeper_parts(c, table),
        *_candidates_parts(c, table),
        *_slices_parts(c, table),
    ]
