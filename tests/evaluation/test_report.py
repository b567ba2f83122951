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
