"""The report as people read it: interval format, aligned table, a self-contained chart page."""

from __future__ import annotations

from gateway.report import compute, render
from tests.report.test_compute import rec


def test_success_is_printed_as_percent_with_its_interval() -> None:
    assert render.pct_ci(0.92, [0.851, 0.96]) == "92.0% [85.1\u201396.0]"
    assert render.pct_ci(None, None) == "-"


def test_table_columns_are_aligned_and_end_with_the_total() -> None:
    recs = [rec(1, arm="canary", workflow="w"), rec(2), rec(3, requested_tier="T1", tier="T1", agent=None)]
    rep = compute.build(recs, {("acme", "r1"): {"outcome": "success"}}, {}, meta={"since": "d", "until": "d"})
    lines = render.table(rep).splitlines()
    header, rows = lines[1], lines[2:8]  # 3 groups, 2 tiers, the total
    assert header.split()[:3] == ["TIER", "AGENT", "ARM"]
    assert rows[-1].startswith("TOTAL")
    col = header.index("REQUESTS") + len("REQUESTS")  # right-aligned numbers end under their header
    assert all(r[col - 1].isdigit() for r in rows)
    assert "100.0% [" in lines[2] and "local tiers cost" in render.table(rep)


def test_html_page_is_self_contained_with_labelled_charts() -> None:
    rep = compute.build(
        [rec(1, arm="canary"), rec(2)],
        {("acme", "r1"): {"outcome": "success"}},
        {},
        [
            {
                "source_tier": "T3",
                "agent": "developer",
                "tier": "T0",
                "model": "m",
                "latency_ms": 1,
                "cost_micros": 1,
                "status": 200,
            }
        ],
    )
    page = render.html_page(rep)
    assert page.count("<svg") == 3 and "<script" not in page and "<link" not in page
    for label in (
        "USD per request",
        "same tokens on GPT-4",
        "success rate (95% Wilson interval)",
        "p95",
        "T0 · developer · canary",
        "Shadow calls",
    ):
        assert label in page
    assert "No requests in this range" in render.html_page(compute.build([], {}, {}))
