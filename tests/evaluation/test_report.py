"""The HTML report as a reader meets it: wide tables scroll instead of being cut off, a caption sits with its
table, and data without slice columns gets advice instead of an empty table."""

from __future__ import annotations

import copy


def test_wide_tables_scroll_and_captions_sit_with_their_tables(tiny_run):
    _, result = tiny_run
    html = result.report.read_text()
    assert html.count("<table>") == html.count("<div class='table-wrap'><table>") > 3
    assert ".table-wrap{overflow-x:auto" in html
    caption = html.index("Coverage of each method per slice")
    assert html.index("<table>", caption) - caption < 300  # the caption is right above its table


def test_data_without_slice_columns_gets_advice_not_an_empty_table(tiny_run):
    from roadwork.evaluation.report import render_html

    _, result = tiny_run
    metrics = copy.deepcopy(result.metrics)
    metrics["slices"] = {}
    metrics.pop("conformal_comparison", None)
    html = render_html(metrics=metrics, figures={}, data_report={}, config_yaml="", run_name="folder")
    start = html.index("<h2>Per-slice results</h2>")
    section = html[start : html.index("<h2>", start + 5)]
    assert "<table>" not in section and "no slice columns" in section


def test_before_and_after_calibration_compare_one_path(tiny_run):
    """Like with like: the before → after pairs are the model alone raw → the model alone calibrated, recomputed
    here from the stored test logits; the served composite (the cascade) is its own line, labelled."""
    import numpy as np

    from roadwork.evaluation.report import summary_rows
    from roadwork.pipeline.artifacts import load_policy, load_predictions
    from roadwork.trust import metrics as M
    from roadwork.trust import softmax
    from roadwork.trust.calibration import calibrate_proba

    _, result = tiny_run
    m = result.metrics
    test = load_predictions(result.run_dir / "predict", "test")
    policy = load_policy(result.run_dir)
    raw, cal = softmax(test.logits), calibrate_proba(policy.calibrator, test.logits, test.slices)
    alone = m["model_alone"]
    assert alone["nll_raw"] == M.nll(raw, test.labels) and alone["nll"] == M.nll(cal, test.labels)
    assert np.isclose(alone["ece_raw"], M.ece(raw, test.labels, m["test"]["ece"]["bins"]))
    rows = dict(summary_rows(m))
    assert rows["model alone: NLL raw → calibrated"] == f"{alone['nll_raw']:.4f} → {alone['nll']:.4f}"
    served = next(k for k in rows if k.startswith("served ("))
    assert m["served"]["path"] in served and rows[served].endswith(f"{m['test']['nll']:.4f}")
    assert not any(k.startswith(("ECE (15 bins) before", "NLL before")) for k in rows)
    card = (result.run_dir / "evaluate" / "MODEL_CARD.md").read_text()
    assert "model alone: NLL raw → calibrated" in card and served in card
    html = result.report.read_text()
    assert "Calibration methods (the model alone)" in html and "model alone: ECE" in html
