"""Self-contained ``report.html`` (plots embedded as base64) and ``MODEL_CARD.md``."""

from __future__ import annotations

import base64
import html
import math
from typing import Any

__all__ = [
    "label_audit_html",
    "model_check_line",
    "refresh_outputs",
    "render_html",
    "render_model_card",
    "summary_rows",
    "variant_card_line",
    "variants_html",
    "with_section",
    "with_variants",
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2rem}
table{border-collapse:collapse;margin:.6rem 0 1.4rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.bad{background:#fde2e2}.ok{background:#e3f5e1}
figure{margin:.6rem 0 1.4rem}img{max-width:100%;border:1px solid #eee}
.suspects{display:flex;flex-wrap:wrap;gap:.6rem}.suspects figure{width:150px;margin:0;font-size:.8rem}
.note{background:#f7f7fb;border-left:4px solid #88a;padding:.6rem 1rem}
.warnings{background:#fff6e0;border-left:4px solid #e0a000;padding:.6rem 1rem;margin:1rem 0}
.check-bad{background:#fde8e8;border-left-color:#c00000}
.check-ok{border-left:4px solid #2a8a2a;padding:.4rem 1rem;background:#eef8ee}
.table-wrap{overflow-x:auto;max-width:100%}
"""


def _fmt_thr(v: float | None) -> str:
    return "∞ (none)" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _answer_rule(s: dict[str, Any]) -> str:
    """The abstain rule in words; says plainly when nothing could be certified (threshold unbounded)."""
    thr = s.get("threshold")
    if thr is None or not math.isfinite(thr):
        return "certifies nothing: every image is abstained on (see the warnings above)"
    return f"answers only images whose calibrated confidence is at least {thr:.4f}"


def model_check_line(metrics: dict[str, Any]) -> str:
    """The model check in one line (CLI, report headline, model card): the verdict and its figures."""
    mc = metrics.get("model_check")
    if not mc:
        return ""
    verdict = {"ok": "better than chance", "chance": "NO BETTER THAN CHANCE", "weak": "WEAK"}[mc["verdict"]]
    text = (
        f"model check: {verdict} — the model alone on {mc['n']} test images: accuracy {mc['accuracy']:.3f} "
        f"(a constant guess: {mc['constant_accuracy']:.3f}), MCC {mc['mcc']:.3f} [{mc['mcc_ci95'][0]:.3f}, "
        f"{mc['mcc_ci95'][1]:.3f}], AUROC {mc['auroc']:.3f} [{mc['auroc_ci95'][0]:.3f}, {mc['auroc_ci95'][1]:.3f}]"
    )
    if mc.get("baseline"):
        text += f"; a logistic regression on colour/edge features: {mc['baseline']['accuracy']:.3f}"
    return text


def _model_check_html(metrics: dict[str, Any]) -> str:
    """The report's headline: is the model worth the figures below? Its findings, before any calibration figure."""
    mc = metrics.get("model_check")
    if not mc:
        return ""
    if mc["verdict"] == "ok" and not mc["warnings"]:
        return f"<p class='check-ok' id='model-check'>{html.escape(model_check_line(metrics))}.</p>"
    items = "".join(f"<li>{html.escape(w)}</li>" for w in mc["warnings"])
    return (
        f"<div class='warnings check-bad' id='model-check' role='alert'><b>{html.escape(model_check_line(metrics))}"
        f".</b><ul>{items}</ul></div>"
    )


def _answers_line(s: dict[str, Any]) -> str:
    """The share of test images the policy answered, and a plain warning when it is none."""
    if s["coverage"] == 0:
        return (
            f"**none** — the policy abstains on every test image (abstain=true): no confidence threshold "
            f"certifies selective risk ≤ {s['target_risk']} at δ={s['delta']}; see the warnings."
        )
    return f"{s['coverage']:.1%} of test images, with certified selective risk ≤ {s['target_risk']} (δ={s['delta']})"


def _warnings_html(metrics: dict[str, Any]) -> str:
    shown = set((metrics.get("model_check") or {}).get("warnings") or [])  # in the headline already
    found = [w for w in metrics.get("warnings") or [] if w not in shown]
    if not found:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in found)
    return (
        f"<div class='warnings' role='alert'><b>Warnings — read before deploying.</b><ul>{items}</ul></div>"
    )


def _served_html(metrics: dict[str, Any]) -> str:
    served, alone = metrics.get("served"), metrics.get("model_alone")
    if not served:
        return ""
    text = (
        f"<p class='sub'>Every test figure below is the exported bundle's — {html.escape(served['what'])}; "
        f"path: {html.escape(served['path'])}."
    )
    if alone:
        text += (
            f" The model alone (labelled, not what is served): accuracy {alone['accuracy']:.4f}, "
            f"AUROC {alone['auroc']:.4f}, ECE {alone['ece']:.4f}."
        )
    return text + "</p>"


def variants_html(metrics: dict[str, Any]) -> str:
    """The section on what ``roadwork bench ... select=true`` chose, with each measured variant's served figures
    (end to end on the test split), inside a ``<section id='variants'>`` that :func:`with_variants` replaces."""
    variants = metrics.get("variants") or {}
    if not variants:
        return "<section id='variants'></section>"
    chosen = metrics.get("served_variant")
    rows = [
        [
            name,
            v["n"],
            v["accuracy"],
            v["ece"],
            v["coverage"],
            v["answered"],
            v["selective_risk"],
        ]
        for name, v in variants.items()
    ]
    return (
        "<section id='variants'><h2>Served variant</h2><p>After <code>roadwork bench ... select=true</code>, "
        f"<code>variant=auto</code> serves <b>{html.escape(str(chosen))}</b>. Each row is that variant end to "
        "end (decode, cascade, its own certified policy) on this report's test split; the selection itself "
        "compared variants on the val split. The summary and the figures below are the fp32 bundle's; its guarantees are certified by its own policy file.</p>"
        + _table(
            ["variant", "n", "accuracy", "ECE", "coverage", "answered", "error on answered"],
            rows,
            ["ok" if name == chosen else "" for name in variants],
        )
        + "</section>"
    )


def variant_card_line(metrics: dict[str, Any]) -> str:
    """The model card's line on the variant ``variant=auto`` serves and its served test figures."""
    chosen = metrics.get("served_variant")
    v = (metrics.get("variants") or {}).get(chosen or "")
    if not v:
        return "- **Served variant:** fp32 (no `roadwork bench ... select=true` yet)"
    risk = "—" if v["selective_risk"] is None else f"{v['selective_risk']:.4f}"
    cert = v.get("certified") or {}
    own = (
        f"; its own certificate ({cert['policy_file']}): {_answer_rule(cert)}, error on answered ≤ "
        f"{cert['target_risk']} with probability ≥ {1 - cert['delta']:.2f}"
        if cert
        else ""
    )
    return (
        f"- **Served variant:** `{chosen}` (chosen by `roadwork bench ... select=true`); end to end on the "
        f"{v['n']} test images: accuracy {v['accuracy']:.4f}, ECE {v['ece']:.4f}, coverage "
        f"{v['coverage']:.4f}, answered {v['answered']:.4f}, error on answered {risk}{own}. The guarantees "
        "below are fp32's"
    )


def with_variants(report_html: str, card_md: str, metrics: dict[str, Any]) -> tuple[str, str]:
    """``report.html`` and ``MODEL_CARD.md`` with their served-variant section and line replaced by
    ``metrics``' (what ``roadwork bench`` does after a selection, without re-rendering the figures)."""

    report_html = with_section(report_html, "variants", variants_html(metrics), before="<h2>Summary</h2>")
    line = variant_card_line(metrics)
    lines = card_md.splitlines()
    at = [i for i, x in enumerate(lines) if x.startswith("- **Served variant:**")]
    if at:
        lines[at[0]] = line
    else:
        after = [i for i, x in enumerate(lines) if x.startswith("- **Answers:**")]
        lines.insert(after[0] + 1 if after else min(len(lines), 1), line)
    return report_html, "\n".join(lines) + "\n"


_CERT_METHOD = {
    "ltt": "Learn-then-Test: exact binomial p-values, fixed-sequence testing",
    "sgr": "SGR: binary search with Clopper–Pearson bounds",
    "bonferroni": "Clopper–Pearson bounds, union over a fixed grid of thresholds",
}


def refresh_outputs(stage_dir: Any, texts: dict[str, str]) -> None:
    """Rewrite files of a finished stage (``evaluate``: the report, the card) and their sizes and sha256 in its
    ``manifest.json``, so the stage stays a valid cache entry. Each file is replaced whole (temporary, rename)."""
    import hashlib
    import json
    from pathlib import Path

    from roadwork.jsonio import write_json

    stage = Path(stage_dir)
    for name, text in texts.items():
        tmp = stage / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(stage / name)
    manifest_file = stage / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for name in texts:
        entry = manifest.get("outputs", {}).get(name)
        if entry is not None:
            data = (stage / name).read_bytes()
            entry.update({"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    write_json(manifest_file, manifest)


def with_section(report_html: str, section_id: str, section: str, *, before: str | None = None) -> str:
    """``report_html`` with its ``<section id='SECTION_ID'>`` replaced by ``section``; a report without one gets
    it inserted ahead of ``before`` (else at the end of the body)."""
    import re

    pattern = re.compile(rf"<section id='{re.escape(section_id)}'>.*?</section>", re.S)
    if pattern.search(report_html):
        return pattern.sub(lambda _: section, report_html, count=1)
    if before is not None and before in report_html:
        return report_html.replace(before, section + "\n" + before, 1)
    return report_html.replace("</body>", section + "\n</body>", 1)


def label_audit_html(result: dict[str, Any], suspects: list[dict[str, Any]]) -> str:
    """The label audit's section (``roadwork audit``): the estimated flip rates, the warning when material, and
    the top suspects with a thumbnail each (``suspects``: id, given, suggested, score, ``thumb`` JPEG bytes)."""
    rates = ", ".join(f"{html.escape(c)} {100 * r:.1f} %" for c, r in result["flip_rate_per_class"].items())
    out = [
        "<section id='label-audit'>",
        "<h2>Label audit</h2>",
        f"<p>Confident learning (cleanlab) on the out-of-sample probabilities of {result['n']} calibration and "
        f"test labels: estimated flip rate <b>{100 * result['flip_rate']:.1f} %</b> (per given class: {rates}); "
        f"{len(result['issues'])} likely label errors, listed in <code>audit/label_issues.csv</code>.</p>",
    ]
    if result.get("suggested_label_flip_rate") is not None:
        out.append(
            "<div class='warnings'>The conformal guarantee assumes clean calibration labels. Fix the labels "
            "below, or rerun with <code>conformal.label_flip_rate="
            f"{result['suggested_label_flip_rate']}</code>.</div>"
        )
    cells = []
    for s in suspects:
        src = "data:image/jpeg;base64," + base64.b64encode(s["thumb"]).decode() if s.get("thumb") else ""
        img = f'<img alt="{html.escape(s["id"])}" src="{src}">' if src else ""
        cells.append(
            f'<figure id="fig-suspect-{html.escape(s["id"])}">{img}<figcaption>{html.escape(s["id"])}: given '
            f"<b>{html.escape(s['given'])}</b>, suggested {html.escape(s['suggested'])} (quality "
            f"{s['score']:.3f})</figcaption></figure>"
        )
    if cells:
        out.append("<h3>Top suspects</h3><div class='suspects'>" + "".join(cells) + "</div>")
    out.append("</section>")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:  # undefined (e.g. the error on answered images when none is answered)
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>")
    return f"<div class='table-wrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _img(name: str, png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode()
    return (
        f'<figure id="fig-{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers, shared by the terminal summary and the report."""
    t, c, s = metrics["test"], metrics["conformal"], metrics["selective"]
    cascade = []
    if metrics.get("cascade"):
        k = metrics["cascade"]
        ratio = "" if k["cost_ratio"] is None else f" at {k['cost_ratio']:.0%} of its cost"
        cascade = [
            (
                "cascade (" + " → ".join(st["name"] for st in k["stages"]) + ")",
                f"accuracy {k['accuracy']:.4f}{ratio}",
            )
        ]
    return [
        ("test images", f"{t['n']}"),
        ("accuracy", f"{t['accuracy']:.4f}"),
        ("MCC / AUROC", f"{t['mcc']:.4f} / {t['auroc']:.4f}"),
        *_calibration_rows(metrics),
        *_request_kind_rows(metrics),
        (f"conformal coverage (target ≥ {1 - c['alpha']:.2f})", f"{c['coverage']:.4f}"),
        ("mean set size / singletons", f"{c['mean_set_size']:.3f} / {c['singleton_rate']:.3f}"),
        (
            f"selective risk (target ≤ {s['target_risk']}, δ={s['delta']})",
            "— (nothing answered)" if s["risk"] is None else f"{s['risk']:.4f}",
        ),
        ("answered (coverage) at certified threshold", f"{s['coverage']:.4f}"),
        *cascade,
    ]


def _request_kind_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """A slice-dependent policy answers requests with and without slice metadata differently: both, side by side."""
    kinds = metrics.get("request_kinds")
    if not kinds:
        return []

    def fmt(k: dict[str, Any]) -> str:
        risk = "—" if k["selective_risk"] is None else f"{k['selective_risk']:.4f}"
        return f"answered {k['answered']:.4f}, risk {risk}, coverage {k['coverage']:.4f}"

    cols = ", ".join(kinds["slice_columns"])
    return [
        (f"requests with metadata ({cols})", fmt(kinds["with_metadata"])),
        ("bare requests (no metadata)", fmt(kinds["bare"])),
    ]


def _calibration_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Before → after calibration on one path (the model alone: raw softmax → calibrated), and the served path's
    own figures on their own line (a cascade's composite is not the model calibrated)."""
    t, alone = metrics["test"], metrics.get("model_alone") or {}
    bins = t["ece"].get("bins", 15)
    served = (metrics.get("served") or {}).get("path", "model")
    if "ece_raw" not in alone:  # metrics.json written before the like-with-like rows
        return [
            (
                f"ECE ({bins} bins) before → after",
                f"{t['ece']['uncalibrated']:.4f} → {t['ece']['calibrated']:.4f}",
            ),
            ("NLL before → after", f"{t['nll_uncalibrated']:.4f} → {t['nll']:.4f}"),
        ]
    return [
        (f"model alone: ECE ({bins} bins) raw → calibrated", f"{alone['ece_raw']:.4f} → {alone['ece']:.4f}"),
        ("model alone: NLL raw → calibrated", f"{alone['nll_raw']:.4f} → {alone['nll']:.4f}"),
        (f"served ({served}): ECE / NLL", f"{t['ece']['calibrated']:.4f} / {t['nll']:.4f}"),
    ]


def _guarantees_note(metrics: dict[str, Any]) -> str:
    """What the prediction sets and the abstain rule promise, and when they do not hold."""
    c, s = metrics["conformal"], metrics["selective"]
    return (
        "<div class='note'><b>What the guarantees mean.</b> "
        f"Prediction sets contain the true class for at least {1 - c['alpha']:.0%} of images <i>on average over "
        "images and calibration draws</i>, provided calibration and test images are exchangeable (drawn from "
        f"the same distribution). The abstain rule {_answer_rule(s)}; with probability ≥ {1 - s['delta']:.0%} "
        "over the calibration draw, the error rate "
        f"on answered images is at most {s['target_risk']}. Neither holds under distribution shift.</div>"
    )


def _figure_parts(figures: dict[str, tuple[bytes, str]]) -> list[str]:
    """The figures in reading order, each under a heading from its caption."""
    order = ["reliability", "risk_coverage", "confusion", "training", "samples", "mistakes"]
    return [
        f"<h2>{html.escape(figures[name][1].split(':')[0])}</h2>{_img(name, *figures[name])}"
        for name in order
        if name in figures
    ]


def _calibration_methods(metrics: dict[str, Any]) -> list[str]:
    """Every calibrator fitted on the calibration split, scored on test, the chosen one shaded."""
    comparison = metrics.get("calibration_comparison", {})
    if not comparison:
        return []
    chosen = metrics["calibration"]["kind"]
    cols = ("nll", "ece", "ece_equal_mass", "classwise_ece", "brier", "accuracy")
    return [
        "<h2>Calibration methods (the model alone)</h2><p>Every calibrator fitted on the calibration split, "
        "scored on test, on the model alone's logits (not the served cascade's composite: its figures are in the "
        f"summary). The policy uses <b>{html.escape(chosen)}</b> (shaded); 'none' is the raw model.</p>",
        _table(
            ["method", "NLL", "ECE", "ECE (equal mass)", "classwise ECE", "Brier", "accuracy"],
            [[k, *(r[col] for col in cols)] for k, r in comparison.items()],
            ["ok" if k == chosen else "" for k in comparison],
        ),
    ]


def _data_section(data_report: dict[str, Any]) -> list[str]:
    """The splits per class, what was used and skipped, and the duplicate groups."""
    split_rows = [[sp, *cnt.values()] for sp, cnt in data_report.get("split_counts", {}).items()]
    class_names = list(data_report.get("class_counts", {}))
    skipped = data_report.get("skipped", [])
    parts = [
        "<h2>Data</h2>",
        _table(["split", *class_names], split_rows),
        f"<p>{data_report.get('n_used', 0)} images used of {data_report.get('n_found', 0)} found; "
        f"{len(skipped)} skipped; {len(data_report.get('duplicates', []))} duplicate groups.</p>",
    ]
    if skipped:
        parts.append(_table(["skipped file", "reason"], [[r["id"], r["reason"]] for r in skipped]))
    if data_report.get("duplicates"):
        parts.append(
            _table(["duplicate group (same content)"], [[", ".join(g)] for g in data_report["duplicates"]])
        )
    return parts


def render_html(
    *,
    metrics: dict[str, Any],
    figures: dict[str, tuple[bytes, str]],
    data_report: dict[str, Any],
    config_yaml: str,
    run_name: str,
) -> str:
    """The run's self-contained HTML report (figures inlined): warnings, what is served, the summary, the
    guarantees, the figures, the decisions, calibration and conformal comparisons, the cascade, the slices,
    the data and the configuration."""
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>roadwork report: "
        f"{html.escape(run_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>roadwork report — {html.escape(run_name)}</h1>",
        f"<p class='sub'>classes: {html.escape(', '.join(metrics['classes']))}</p>",
        _model_check_html(metrics),
        _warnings_html(metrics),
        _served_html(metrics),
        variants_html(metrics),
        "<h2>Summary</h2>",
        _table(["metric", "value"], [list(r) for r in summary_rows(metrics)]),
        _guarantees_note(metrics),
        *_figure_parts(figures),
        *_decision_rows(metrics),
        *_calibration_methods(metrics),
        *_conformal_rows(metrics),
    ]
    if metrics.get("cascade"):
        from roadwork.evaluation.cascade import cascade_section

        parts.extend(cascade_section(metrics, _table, _img))
    parts.extend(_slice_section(metrics))
    parts.extend(_data_section(data_report))
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(config_yaml)}</pre></body></html>")
    return "\n".join(parts)


def _slice_section(metrics: dict[str, Any]) -> list[str]:
    """The per-slice table (rows far below overall accuracy shaded), or advice when there are no slices."""
    parts: list[str] = []
    rows, marks = [], []
    for key, r in metrics["slices"].items():
        rows.append(
            [
                key,
                r["n"],
                r["accuracy"],
                r["ece"],
                r["coverage"],
                r["mean_set_size"],
                r["abstain_rate"],
                r["selective_risk"],
            ]
        )
        marks.append("bad" if r["accuracy"] < metrics["test"]["accuracy"] - 0.05 else "")
    parts.append("<h2>Per-slice results</h2>")
    if rows:
        parts.append("<p>Rows more than 5 points below overall accuracy are shaded.</p>")
        parts.append(
            _table(
                [
                    "slice",
                    "n",
                    "accuracy",
                    "ECE",
                    "coverage",
                    "mean set size",
                    "abstain rate",
                    "selective risk",
                ],
                rows,
                marks,
            )
        )
    else:
        parts.append(
            "<p>This dataset has no slice columns. Pass a CSV/Parquet manifest with columns such as "
            "<code>weather</code>, <code>camera</code> or <code>city</code> beside <code>path,label</code> to get "
            "accuracy, coverage and abstention per slice.</p>"
        )
    return parts


def _decision_rows(metrics: dict[str, Any]) -> list[str]:
    """Binary tasks: the score's operating point and the missed-positive risk control, when configured."""
    out: list[str] = []
    op = metrics.get("operating_point")
    if op:
        chosen, test = op.get("chosen"), op["test"]
        what = (
            "calibrated probability 0.5 (no operating point configured)"
            if chosen is None
            else f"{chosen['criterion']}"
            + (f" (target {chosen['target']})" if chosen.get("target") is not None else "")
            + f": probability {chosen['threshold']:.4f} on the calibration split, remapped to score 0.5"
        )
        out.append(
            f"<h2>Operating point of the score</h2><p>Decision <code>score ≥ 0.5</code> = {html.escape(what)}.</p>"
        )
        rows = [["test", test["accuracy"], test["precision"], test["recall"], test["mcc"]]]
        if chosen is not None:
            rows.insert(
                0, ["calibration", "", chosen["calib_precision"], chosen["calib_recall"], chosen["calib_mcc"]]
            )
        out.append(_table(["split", "accuracy", "precision", "recall", "MCC"], rows))
    rc = metrics.get("risk_control")
    if rc:
        out.append(
            "<h2>Missed-positive risk control</h2><p>Images whose positive-class probability is at least "
            f"{_fmt_thr(rc['threshold'])} are flagged <code>positive_possible</code>; conformal risk control bounds the "
            f"expected share of positives left unflagged by {rc['alpha']} (fitted on {rc['n']} calibration "
            f"positives). Test: miss rate {rc['test_miss_rate']:.4f}, {rc['test_flag_rate']:.1%} of images flagged.</p>"
        )
    return out


def render_model_card(*, metrics: dict[str, Any], run_name: str, backbone: str, data_source: str) -> str:
    """MODEL_CARD.md: the task, data, test figures, guarantees, hardest slices and limits, in Markdown."""
    t, c, s = metrics["test"], metrics["conformal"], metrics["selective"]
    worst = sorted(metrics["slices"].items(), key=lambda kv: kv[1]["accuracy"])[:5]
    lines = [
        f"# Model card — {run_name}",
        "",
        f"- **Task:** image classification into {', '.join(metrics['classes'])}",
        f"- **Backbone:** `{backbone}`",
        f"- **Training data:** `{data_source}`",
        f"- **Test accuracy:** {t['accuracy']:.4f} on {t['n']} images (MCC {t['mcc']:.4f}, AUROC {t['auroc']:.4f})",
        f"- **Model check:** {model_check_line(metrics).removeprefix('model check: ') or 'not run'}",
        f"- **Calibration:** {metrics['calibration']['kind']}; "
        + "; ".join(f"{k} {v}" for k, v in _calibration_rows(metrics)),
        f"- **Figures are of:** {metrics.get('served', {}).get('what', 'the model')}",
        f"- **Answers:** {_answers_line(s)}",
        variant_card_line(metrics),
        "",
        *(f"> **Warning:** {w}" for w in metrics.get("warnings") or []),
        "",
        "## Guarantees and their assumptions",
        "",
        f"1. **Conformal prediction sets ({c['method'].upper()}, α = {c['alpha']}).** For a new image drawn "
        "exchangeably with the calibration images, the set contains its true class with probability at least "
        f"{1 - c['alpha']:.2f}, averaged over images and over the draw of the {c['n_calib']} calibration images. "
        f"Measured on test: coverage {c['coverage']:.4f}, mean set size {c['mean_set_size']:.3f}.",
        f"2. **Certified abstention.** The policy {_answer_rule(s)}. "
        f"With probability ≥ {1 - s['delta']:.2f} over the calibration draw, the error rate on answered images is "
        f"at most {s['target_risk']} ({_CERT_METHOD.get(s.get('method', ''), s.get('method', ''))}). "
        f"Measured on test: answered {s['coverage']:.4f}, error on answered "
        f"{'— (none answered)' if s['risk'] is None else format(s['risk'], '.4f')}.",
        "",
        "**Assumption:** calibration and deployment images are exchangeable (same distribution). Under "
        "distribution shift — new cities, cameras, seasons — or label noise in the calibration split, neither "
        "guarantee holds as stated. Monitor the slices below and recalibrate on fresh labelled data.",
        "",
        "## Weakest slices (test)",
        "",
        "| slice | n | accuracy | coverage |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {r['n']} | {r['accuracy']:.4f} | {r['coverage']:.4f} |" for k, r in worst]
    return "\n".join(lines) + "\n"


def _conformal_rows(metrics: dict[str, Any]) -> list[str]:
    """Every conformal method: coverage and set size overall, the worst slice, and coverage per slice."""
    comp = metrics.get("conformal_comparison")
    if not comp or not comp["methods"]:
        return []
    methods = comp["methods"]
    target = 1 - comp["alpha"]
    chosen = metrics["conformal"]["method"]
    out = [
        "<h2>Conformal methods</h2><p>Each method fitted at α = "
        f"{comp['alpha']:g} on the calibration split, scored on test. Target coverage {target:.2f}; "
        f"the policy uses <b>{html.escape(chosen)}</b>.</p>",
        _table(
            ["method", "coverage", "mean set size", "worst slice", "its coverage"],
            [
                [
                    k,
                    r["coverage"],
                    r["mean_set_size"],
                    r["worst_slice"] or "–",
                    r["worst_slice_coverage"] or "–",
                ]
                for k, r in methods.items()
            ],
            ["ok" if k == chosen else "" for k in methods],
        ),
    ]
    slices = sorted(next(iter(methods.values()))["slices"])
    if slices:
        rows, marks = [], []
        for sl in slices:
            cov = [methods[m]["slices"][sl]["coverage"] for m in methods]
            rows.append([sl, next(iter(methods.values()))["slices"][sl]["n"], *cov])
            marks.append("bad" if min(cov) < target - 0.03 else "")
        out.append(
            "<p>Coverage of each method per slice. Slices whose coverage falls more than 3 points below the "
            "target are shaded: Mondrian by that column is the fix.</p>"
        )
        out.append(_table(["slice", "n", *(f"{m} coverage" for m in methods)], rows, marks))
    return out
