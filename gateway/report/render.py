"""The report for people: an aligned terminal table, and one self-contained HTML page with SVG charts.

The page has no scripts, stylesheets or fonts from elsewhere (it is opened from a file, mailed, archived):
every chart is inline SVG drawn here. Input is the dict compute.build returns; nothing is recomputed.
"""

from __future__ import annotations

import html
import math
from typing import Any

from gateway.metering.pricing import usd

__all__ = ["html_page", "pct_ci", "summary_line", "table"]

_DASH = "\u2013"  # en dash, as in a printed interval
_BLUE, _GREY, _GREEN, _ORANGE = "#2f6fb3", "#b0b7c0", "#2e8b57", "#d9822b"


def pct_ci(rate: float | None, ci: list[float] | None) -> str:
    """`92.0% [85.1-96.0]` (with an en dash), or `-` without feedback."""
    if rate is None or ci is None:
        return "-"
    return f"{rate * 100:.1f}% [{ci[0] * 100:.1f}{_DASH}{ci[1] * 100:.1f}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _money(micros: int | None) -> str:
    return "-" if micros is None else "$" + usd(micros)


def _ms(v: int | None) -> str:
    return "-" if v is None else str(v)


_COLUMNS = (
    "TIER",
    "AGENT",
    "ARM",
    "REQUESTS",
    "WORKFLOWS",
    "SUCCESS [95% CI]",
    "FEEDBACK",
    "P50 MS",
    "P95 MS",
    "COST/REQ",
    "COST/WORKFLOW",
    "GPT-4/REQ",
    "COST",
    "SAVED",
)


def _cells(tier: str, agent: str, arm: str, f: dict[str, Any]) -> list[str]:
    return [
        tier,
        agent,
        arm,
        str(f["requests"]),
        str(f["workflows"]),
        pct_ci(f["success_rate"], f["success_ci95"]),
        str(f["feedback"]),
        _ms(f["latency_p50_ms"]),
        _ms(f["latency_p95_ms"]),
        _money(f["cost_per_request_micros"]),
        _money(f["cost_per_workflow_micros"]),
        _money(f["counterfactual_per_request_micros"]),
        _money(f["cost_micros"]),
        _pct(f["saved_share"]),
    ]


def _align(rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def summary_line(rep: dict[str, Any]) -> str:
    """One sentence a person reads first: what local serving cost against GPT-4, and how well it did."""
    local, total = rep["local"], rep["total"]
    parts = [f"{total['requests']} requests"]
    if local["cost_share"] is not None:
        parts.append(
            f"local tiers cost {local['cost_share'] * 100:.1f}% of GPT-4 for the same tokens "
            f"({local['requests']} requests)"
        )
    parts.append(f"saved {_pct(total['saved_share'])} overall ({_money(total['saved_micros'])})")
    if total["success_rate"] is not None:
        parts.append(
            f"success rate {pct_ci(total['success_rate'], total['success_ci95'])} over {total['feedback']} outcomes"
        )
    else:
        parts.append("no feedback yet")
    return "; ".join(parts)


def table(rep: dict[str, Any]) -> str:
    """The terminal report: groups, then each tier's total and the overall total; then the shadow calls."""
    rows = [list(_COLUMNS)]
    rows += [_cells(r["tier"], r["agent"], r["arm"], r) for r in rep["data"]]
    rows += [_cells(t["tier"], "*", "*", t) for t in rep["tiers"]]
    rows.append(_cells("TOTAL", "", "", rep["total"]))
    head = f"{rep.get('since')} .. {rep.get('until')} (UTC), tenants: {', '.join(rep.get('tenants') or [])}"
    out = [head, _align(rows, 3), "", summary_line(rep)]
    if rep["shadow"]:
        srows = [["SOURCE", "AGENT", "SHADOW TIER", "MODEL", "REQUESTS", "ERRORS", "P50 MS", "P95 MS", "COST (OURS)"]]
        srows += [
            [
                s["source_tier"],
                s["agent"],
                s["tier"],
                s["model"],
                str(s["requests"]),
                str(s["errors"]),
                _ms(s["latency_p50_ms"]),
                _ms(s["latency_p95_ms"]),
                _money(s["cost_micros"]),
            ]
            for s in rep["shadow"]
        ]
        out += ["", "shadow calls (never billed to tenants):", _align(srows, 4)]
    return "\n".join(out)


# -- SVG ---------------------------------------------------------------------------------------------------

_LABEL_W, _BAR_H, _GAP, _PLOT_W, _TOP = 230, 14, 10, 520, 44


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    return float(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= v))


def _axis(xmax: float, fmt: Any, y0: int, y1: int, title: str) -> list[str]:
    out = []
    for i in range(5):
        x = _LABEL_W + _PLOT_W * i / 4
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#e3e6ea"/>')
        out.append(
            f'<text x="{x:.1f}" y="{y1 + 14}" text-anchor="middle" class="tick">{html.escape(fmt(xmax * i / 4))}</text>'
        )
    out.append(
        f'<text x="{_LABEL_W + _PLOT_W / 2}" y="{y1 + 32}" text-anchor="middle" class="axis">{html.escape(title)}</text>'
    )
    return out


def _legend(items: list[tuple[str, str]]) -> list[str]:
    out, x = [], _LABEL_W
    for name, color in items:
        out.append(f'<rect x="{x}" y="24" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="34" class="tick">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def _svg(title: str, body: list[str], height: int) -> str:
    w = _LABEL_W + _PLOT_W + 180  # room for the value labels right of the longest bar or whisker
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" viewBox="0 0 {w} {height}" '
        f'role="img" aria-label="{html.escape(title)}"><text x="4" y="16" class="title">{html.escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _bars(
    title: str, labels: list[str], series: list[tuple[str, str, list[float | None]]], fmt: Any, axis_title: str
) -> str:
    """Horizontal grouped bars: one row per label, one bar per series."""
    vmax = _nice_max(max([v for _, _, vs in series for v in vs if v is not None] or [0]))
    row_h = _BAR_H * len(series) + _GAP
    y1 = _TOP + row_h * len(labels)
    body = _axis(vmax, fmt, _TOP - 4, y1, axis_title) + _legend([(n, c) for n, c, _ in series])
    for i, label in enumerate(labels):
        y = _TOP + i * row_h
        body.append(
            f'<text x="{_LABEL_W - 6}" y="{y + row_h / 2 + 3:.1f}" text-anchor="end" class="label">{html.escape(label)}</text>'
        )
        for j, (name, color, values) in enumerate(series):
            v = values[i]
            by = y + j * _BAR_H
            if v is None:
                body.append(f'<text x="{_LABEL_W + 4}" y="{by + 11}" class="tick">no data</text>')
                continue
            w = _PLOT_W * v / vmax
            body.append(
                f'<rect x="{_LABEL_W}" y="{by}" width="{w:.1f}" height="{_BAR_H - 2}" fill="{color}">'
                f"<title>{html.escape(f'{label}: {name} {fmt(v)}')}</title></rect>"
            )
            body.append(f'<text x="{_LABEL_W + w + 4:.1f}" y="{by + 11}" class="tick">{html.escape(fmt(v))}</text>')
    return _svg(title, body, y1 + 44)


def _success(labels: list[str], rows: list[dict[str, Any]]) -> str:
    """Success rate as a dot with its 95% interval as whiskers, on a 0-100% axis."""
    row_h = 22
    y1 = _TOP + row_h * len(labels)
    body = _axis(1.0, lambda v: f"{v * 100:.0f}%", _TOP - 4, y1, "success rate (95% Wilson interval)")
    body += _legend([("success rate", _GREEN), ("95% interval", "#555")])
    for i, (label, r) in enumerate(zip(labels, rows, strict=True)):
        cy = _TOP + i * row_h + row_h / 2
        body.append(
            f'<text x="{_LABEL_W - 6}" y="{cy + 3:.1f}" text-anchor="end" class="label">{html.escape(label)}</text>'
        )
        if r["success_rate"] is None:
            body.append(f'<text x="{_LABEL_W + 4}" y="{cy + 3:.1f}" class="tick">no feedback</text>')
            continue
        lo, hi = (_LABEL_W + _PLOT_W * v for v in r["success_ci95"])
        x = _LABEL_W + _PLOT_W * r["success_rate"]
        body.append(f'<line x1="{lo:.1f}" y1="{cy}" x2="{hi:.1f}" y2="{cy}" stroke="#555" stroke-width="1.5"/>')
        for e in (lo, hi):
            body.append(
                f'<line x1="{e:.1f}" y1="{cy - 5}" x2="{e:.1f}" y2="{cy + 5}" stroke="#555" stroke-width="1.5"/>'
            )
        text = f"{pct_ci(r['success_rate'], r['success_ci95'])}, n={r['feedback']}"
        body.append(
            f'<circle cx="{x:.1f}" cy="{cy}" r="5" fill="{_GREEN}"><title>{html.escape(label + ": " + text)}</title></circle>'
        )
        body.append(f'<text x="{hi + 8:.1f}" y="{cy + 3:.1f}" class="tick">{html.escape(text)}</text>')
    return _svg("Success rate per arm", body, y1 + 44)


_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a}
h1{font-size:20px;margin:0 0 4px}p.sub{color:#555;margin:0 0 12px}p.summary{font-size:15px;background:#f3f6fa;
padding:10px 12px;border-left:4px solid #2f6fb3}svg{display:block;margin:18px 0}.title{font-size:14px;font-weight:600}
.label{font-size:12px}.tick{font-size:11px;fill:#444}.axis{font-size:12px;fill:#222}table{border-collapse:collapse;
font-size:12px;margin:12px 0}th,td{padding:4px 8px;border-bottom:1px solid #e3e6ea;text-align:right}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left}th{background:#f3f6fa}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(rep: dict[str, Any]) -> str:
    """One HTML file: summary, three charts (cost against the all-GPT-4 counterfactual, success rate with
    its interval, latency), the table, and the shadow calls."""
    rows = rep["data"]
    labels = [f"{r['tier']} · {r['agent']} · {r['arm']}" for r in rows]
    charts = (
        [
            _bars(
                "Cost per request: arm vs. all-GPT-4 (T3) counterfactual",
                labels,
                [
                    ("this arm", _BLUE, [r["cost_per_request_micros"] for r in rows]),
                    ("same tokens on GPT-4", _GREY, [r["counterfactual_per_request_micros"] for r in rows]),
                ],
                lambda v: "$" + usd(round(v)),
                "USD per request",
            ),
            _success(labels, rows),
            _bars(
                "Latency per arm",
                labels,
                [
                    ("p50", _BLUE, [r["latency_p50_ms"] for r in rows]),
                    ("p95", _ORANGE, [r["latency_p95_ms"] for r in rows]),
                ],
                lambda v: f"{v:.0f} ms",
                "latency, milliseconds (nearest rank)",
            ),
        ]
        if rows
        else ["<p>No requests in this range.</p>"]
    )
    trows = [_cells(r["tier"], r["agent"], r["arm"], r) for r in rows]
    trows += [_cells(t["tier"], "*", "*", t) for t in rep["tiers"]] + [_cells("TOTAL", "", "", rep["total"])]
    parts = [
        f'<h1>QLP rollout report</h1><p class="sub">{html.escape(str(rep.get("since")))} .. '
        f"{html.escape(str(rep.get('until')))} (UTC) · tenants: {html.escape(', '.join(rep.get('tenants') or []))}</p>",
        f'<p class="summary">{html.escape(summary_line(rep))}</p>',
        *charts,
        "<h2>All figures</h2>",
        _html_table(list(_COLUMNS), trows),
    ]
    if rep["shadow"]:
        parts.append("<h2>Shadow calls (never billed to tenants)</h2>")
        parts.append(
            _html_table(
                ["SOURCE", "AGENT", "SHADOW TIER", "MODEL", "REQUESTS", "ERRORS", "P50 MS", "P95 MS", "COST (OURS)"],
                [
                    [
                        s["source_tier"],
                        s["agent"],
                        s["tier"],
                        s["model"],
                        str(s["requests"]),
                        str(s["errors"]),
                        _ms(s["latency_p50_ms"]),
                        _ms(s["latency_p95_ms"]),
                        _money(s["cost_micros"]),
                    ]
                    for s in rep["shadow"]
                ],
            )
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>QLP rollout report</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
