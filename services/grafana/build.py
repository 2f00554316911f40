"""The Grafana dashboards of the fleet, as reviewable Python; writes services/grafana/dashboards/*.json.

    .venv/bin/python services/grafana/build.py           # regenerate the JSON (check both in)
    .venv/bin/python services/grafana/build.py --check   # exit 1 if the JSON differs from this file

Every query is PromQL over the metric contract in gateway/metrics.py (prefix `qlp_`) and vLLM's metric
names (which the CPU model server exports too). tests/observability runs every one of them against a
real Prometheus scraping a real gateway and model server. The one panel that is not PromQL (cost per
workflow: workflow ids are never labels) is a text panel pointing at the gateway's ledger API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["DASHBOARDS", "DATASOURCE", "build", "main"]

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "qlp-prometheus"}  # provisioning/datasources/prometheus.yml
QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
# vLLM 0.32's names (the release pinned everywhere, services/vllm/requirements-cpu.txt): 0.11's
# `gpu_cache_usage_perc` and `time_per_output_token_seconds` are gone; KV use is `kv_cache_usage_perc` on every
# device, and the per-token gap is `inter_token_latency_seconds`.
KV = "vllm:kv_cache_usage_perc{%(sel)s}"
ITL = "rate(vllm:inter_token_latency_seconds_bucket{%(sel)s}[$__rate_interval])"


# -- panel builders ----------------------------------------------------------------------------------------


def target(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend or "__auto", "range": not instant, "instant": instant}


def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    unit: str = "short",
    *,
    desc: str = "",
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    min0: bool = True,
    lines: list[tuple[float, str]] | None = None,
    maxv: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line+area" if lines else "off"},
        },
        "thresholds": _thresholds([(None, "green"), *lines] if lines else [(None, "green")]),
    }
    if min0:
        defaults["min"] = 0
    if maxv is not None:
        defaults["max"] = maxv
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "w": w,
        "h": h,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(
    title: str,
    expr: str,
    unit: str = "short",
    *,
    desc: str = "",
    w: int = 6,
    h: int = 5,
    steps: list[tuple[float | None, str]] | None = None,
    legend: str = "",
    mappings: list[dict[str, Any]] | None = None,
    decimals: int | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": _thresholds(steps or [(None, "green")]),
        "mappings": mappings or [],
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "w": w,
        "h": h,
        "targets": [target(expr, legend, instant=True)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def text(title: str, markdown: str, *, w: int = 12, h: int = 8) -> dict[str, Any]:
    return {"type": "text", "title": title, "w": w, "h": h, "options": {"mode": "markdown", "content": markdown}}


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "w": 24, "h": 1, "collapsed": False, "panels": []}


def quantiles(metric: str, sel: str, by: str = "tier") -> list[dict[str, Any]]:
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
            f"{{{{{by}}}}} {name}",
        )
        for q, name in QUANTILES
    ]


def variable(name: str, label: str, query: str, *, regex: str = "") -> dict[str, Any]:
    """A multi-value query variable; "All" sends every value as `(a|b|...)` (Grafana's default)."""
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "regex": regex,
        "multi": True,
        "includeAll": True,
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


UP_MAPPINGS = [
    {"type": "value", "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}
]
BREAKER_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green"},
            "1": {"text": "open", "color": "red"},
            "2": {"text": "half-open", "color": "orange"},
        },
    }
]


def dashboard(
    uid: str, title: str, desc: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    """Lay panels out left to right in rows of 24 columns and number them."""
    x = y = row_h = 0
    laid: list[dict[str, Any]] = []
    for i, p in enumerate(panels, start=1):
        w, h = p.pop("w"), p.pop("h")
        if x + w > 24 or p["type"] == "row":
            x, y, row_h = 0, y + row_h, 0
        p = {"id": i, **p, "gridPos": {"x": x, "y": y, "w": w, "h": h}}
        if p["type"] not in ("row", "text"):
            p["datasource"] = DATASOURCE
            for ref, t in zip("ABCDEFGH", p["targets"], strict=False):
                t.update({"refId": ref, "datasource": DATASOURCE})
        laid.append(p)
        x, row_h = x + w, max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return {
        "uid": uid,
        "title": title,
        "description": desc,
        "tags": ["qlp"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [{"title": t, "url": f"/d/{u}", "type": "link"} for u, t in LINKS if u != uid],
        "templating": {"list": variables},
        "panels": laid,
    }


# Every configured tier with a backend (the gateway sets the breaker gauge of each at every scrape): a
# tier that serves nothing, say one whose requests all fall back, is still listed.
TIER = variable("tier", "Tier", "label_values(qlp_backend_breaker_state, tier)")
LINKS = (("qlp-fleet", "Fleet"), ("qlp-cost", "Cost"), ("qlp-model-servers", "Model servers"))


# -- Fleet ---------------------------------------------------------------------------------------------------


def fleet() -> dict[str, Any]:
    t = 'tier=~"$tier"'
    req = f"rate(qlp_requests_total{{{t}}}[$__rate_interval])"
    panels = [
        stat("Requests/s", f"sum({req})", "reqps", desc="All requests, every status."),
        stat(
            "5xx ratio",
            f'(sum(rate(qlp_requests_total{{{t},status_class="5xx"}}[$__rate_interval])) or vector(0)) / sum({req})',
            "percentunit",
            decimals=2,
            steps=[(None, "green"), (0.01, "orange"), (0.05, "red")],
            desc="Share of requests that ended in 5xx (alert QLPHighErrorRate above 5% for 5 minutes).",
        ),
        stat(
            "p95 latency",
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(qlp_request_duration_seconds_bucket{{{t}}}[$__rate_interval])))",
            "s",
            desc="End-to-end, successful requests, streams included.",
        ),
        stat(
            "Backends failing their probe",
            f"sum(1 - min by (tier, backend) (qlp_backend_up{{{t}}}))",
            "none",
            steps=[(None, "green"), (1, "red")],
            desc="Health-probed backends (local model servers) that are down.",
        ),
        row("Traffic"),
        timeseries("Requests/s by tier", [target(f"sum by (tier) ({req})", "{{tier}}")], "reqps", stack=True),
        timeseries(
            "Requests/s by tier and status class",
            [target(f"sum by (tier, status_class) ({req})", "{{tier}} {{status_class}}")],
            "reqps",
        ),
        timeseries(
            "Tokens/s by tier",
            [target(f"sum by (tier, kind) (rate(qlp_tokens_total{{{t}}}[$__rate_interval]))", "{{tier}} {{kind}}")],
            "short",
            desc="Prompt and completion tokens as reported by the upstreams.",
        ),
        timeseries(
            "Share of served traffic by local tier (30 min)",
            [target(f"tier:qlp_requests_served:share_rate30m{{{t}}}", "{{tier}}")],
            "percentunit",
            maxv=1,
            desc="0 while the fleet is busy: QLPNoTrafficOnTier.",
        ),
        timeseries(
            "Requests refused before a tier was chosen",
            [
                target(
                    'sum by (status_class) (rate(qlp_requests_total{tier="none"}[$__rate_interval]))',
                    "{{status_class}}",
                )
            ],
            "reqps",
            desc='Bad keys, malformed bodies, unknown tiers or models: counted under tier "none".',
        ),
        row("Latency"),
        timeseries(
            "Latency p50 / p95 / p99 by tier",
            quantiles("qlp_request_duration_seconds", t),
            "s",
            desc="Request start to the last byte, successful requests.",
        ),
        timeseries(
            "Time to first token p50 / p95 / p99 by tier",
            quantiles("qlp_time_to_first_token_seconds", t),
            "s",
            desc="Request start to the first byte sent to the client.",
        ),
        timeseries(
            "p95 latency against target by tier",
            [
                target(
                    f"tier:qlp_request_duration_seconds:p95_rate5m{{{t}}} / on (tier) qlp:latency_p95_target_seconds",
                    "{{tier}}",
                )
            ],
            "percentunit",
            lines=[(1.0, "red")],
            desc="1 = at the tier's target (qlp:latency_p95_target_seconds): QLPLatencyP95OverTarget.",
        ),
        timeseries(
            "Gateway overhead p50 / p99",
            [
                target(
                    f"histogram_quantile({q}, sum by (tier, le) "
                    f"(rate(qlp_gateway_overhead_seconds_bucket{{{t}}}[$__rate_interval])))",
                    f"{{{{tier}}}} {n}",
                )
                for q, n in ((0.5, "p50"), (0.99, "p99"))
            ],
            "s",
            desc="Time spent in the gateway itself: end-to-end minus waiting on upstreams.",
        ),
        row("Errors and fallbacks"),
        timeseries(
            "5xx ratio by tier",
            [target(f"tier:qlp_requests_errors:ratio_rate5m{{{t}}}", "{{tier}}")],
            "percentunit",
            lines=[(0.05, "red")],
            desc="Over 5 minutes; alert above 5%.",
        ),
        timeseries(
            "Upstream errors/s by kind",
            [
                target(
                    f"sum by (tier, backend, kind) (rate(qlp_upstream_errors_total{{{t}}}[$__rate_interval]))",
                    "{{tier}}/{{backend}} {{kind}}",
                )
            ],
            "reqps",
        ),
        timeseries(
            "Fallbacks/s",
            [
                target(
                    'sum by (from_tier, to_tier) (rate(qlp_fallbacks_total{from_tier=~"$tier"}[$__rate_interval]))',
                    "{{from_tier}} → {{to_tier}}",
                )
            ],
            "reqps",
            desc="Requests served by a tier further down the chain.",
        ),
        timeseries(
            "Retries/s",
            [target(f"sum by (tier) (rate(qlp_retries_total{{{t}}}[$__rate_interval]))", "{{tier}}")],
            "reqps",
            desc="Upstream attempts beyond the first.",
        ),
        timeseries(
            "Rate-limit rejections/s",
            [target(f"sum by (tier) (rate(qlp_rate_limit_rejections_total{{{t}}}[$__rate_interval]))", "{{tier}}")],
            "reqps",
            desc="429 rate_limit_exceeded: a key's requests or tokens per minute.",
        ),
        row("Backends"),
        stat(
            "Health probe",
            f"min by (tier, backend) (qlp_backend_up{{{t}}})",
            "none",
            w=8,
            h=6,
            legend="{{tier}}/{{backend}}",
            mappings=UP_MAPPINGS,
            steps=[(None, "red"), (1, "green")],
            desc="The gateway's last health probe of each model server (QLPBackendDown).",
        ),
        stat(
            "Circuit breaker",
            f"max by (tier, backend) (qlp_backend_breaker_state{{{t}}})",
            "none",
            w=8,
            h=6,
            legend="{{tier}}/{{backend}}",
            mappings=BREAKER_MAPPINGS,
            steps=[(None, "green"), (1, "red"), (2, "orange")],
            desc="Open: ejected after consecutive failures (QLPBackendEjected); covers T3 too.",
        ),
        stat(
            "Scrape targets",
            'min by (job, instance) (up{job=~"qlp-gateway|qlp-model-servers|vllm"})',
            "none",
            w=8,
            h=6,
            legend="{{job}} {{instance}}",
            mappings=UP_MAPPINGS,
            steps=[(None, "red"), (1, "green")],
        ),
        timeseries(
            "Ledger spool depth",
            [target("sum by (instance) (qlp_ledger_spool_depth)", "{{instance}}")],
            "none",
            desc="Charges waiting for Redis (QLPLedgerSpoolNotEmpty after 10 minutes).",
        ),
    ]
    return dashboard(
        "qlp-fleet",
        "QLP / Fleet",
        "Requests, latency, errors, fallbacks and backend health of the gateway, by tier.",
        panels,
        [TIER],
    )


# -- Cost ----------------------------------------------------------------------------------------------------

WORKFLOW_TEXT = """\
Workflow ids are unbounded, so they are never Prometheus labels: cost per workflow comes from the gateway's
ledger (Redis), not from this datasource.

* Top workflows by cost: `GET /v1/ledger/summary?group_by=workflow` on the gateway
  (an admin key sees every tenant; a user key its own tenant).
* One workflow, request by request: `GET /v1/ledger/workflows/<workflow id>`.
* From a shell: `qlp ledger --help`.

Requests carry their workflow in the `X-QLP-Workflow-Id` header.
"""


def cost() -> dict[str, Any]:
    t = 'tier=~"$tier"'
    spent = f"sum(increase(qlp_cost_usd_total{{{t}}}[$__range]))"
    ref = f"sum(increase(qlp_reference_cost_usd_total{{{t}}}[$__range]))"
    panels = [
        stat(
            "Share of the GPT-4 bill removed",
            "1 - sum(increase(qlp_cost_usd_total[$__range])) / sum(increase(qlp_reference_cost_usd_total[$__range]))",
            "percentunit",
            decimals=1,
            steps=[(None, "red"), (0.5, "orange"), (0.8, "green")],
            desc="Over the selected time range, every tier: 1 - booked cost / what the same tokens would have "
            "cost on the reference model (config/pricing.yaml reference_model, GPT-4).",
        ),
        stat("Booked cost", spent, "currencyUSD", decimals=2, desc="Over the selected time range."),
        stat(
            "All-GPT-4 counterfactual",
            ref,
            "currencyUSD",
            decimals=2,
            desc="The same tokens, priced at the reference model.",
        ),
        stat("Saved", f"{ref} - {spent}", "currencyUSD", decimals=2),
        row("Spend"),
        timeseries(
            "USD per hour by tier and model",
            [target(f"tier_model:qlp_cost_usd_per_hour:rate5m{{{t}}}", "{{tier}} {{model}}")],
            "currencyUSD",
            stack=True,
        ),
        timeseries(
            "Fleet against the all-T3 counterfactual (USD per hour)",
            [
                target(f"sum(tier_model:qlp_cost_usd_per_hour:rate5m{{{t}}})", "fleet"),
                target(f"sum(tier_model:qlp_reference_cost_usd_per_hour:rate5m{{{t}}})", "all on GPT-4"),
            ],
            "currencyUSD",
        ),
        timeseries(
            "Share of the GPT-4 bill removed (1 h)",
            [target("qlp:cost_savings:ratio_rate1h", "savings")],
            "percentunit",
            maxv=1,
            min0=False,
        ),
        timeseries(
            "Effective USD per 1M tokens by tier",
            [
                target(
                    f"1e6 * sum by (tier) (rate(qlp_cost_usd_total{{{t}}}[$__rate_interval]))"
                    f" / sum by (tier) (rate(qlp_tokens_total{{{t}}}[$__rate_interval]))",
                    "{{tier}}",
                )
            ],
            "currencyUSD",
        ),
        timeseries(
            "Tokens/s by tier and model",
            [
                target(
                    f"sum by (tier, model, kind) (rate(qlp_tokens_total{{{t}}}[$__rate_interval]))",
                    "{{tier}} {{model}} {{kind}}",
                )
            ],
            "short",
        ),
        text("Cost per workflow", WORKFLOW_TEXT),
        row("Budget"),
        timeseries(
            "Budget burn rate (1 h)",
            [target("qlp:budget_burn:rate1h", "burn")],
            "none",
            lines=[(1.0, "orange"), (2.0, "red")],
            desc="Spend of the last hour scaled to a day, over qlp:daily_budget_usd "
            "(services/prometheus/rules/recording.yml). 1 = on budget; over 2 for 15 minutes: "
            "QLPBudgetBurnRateHigh.",
        ),
        timeseries(
            "Spend over the last 24 h against the daily budget",
            [
                target("sum(increase(qlp_cost_usd_total[24h]))", "spent, last 24 h"),
                target("qlp:daily_budget_usd", "daily budget"),
            ],
            "currencyUSD",
        ),
        timeseries(
            "Budget rejections/s by tier",
            [target(f"sum by (tier) (rate(qlp_budget_rejections_total{{{t}}}[$__rate_interval]))", "{{tier}}")],
            "reqps",
            desc="429 budget_exceeded: a tenant's daily or monthly budget is spent (QLPBudgetRejections).",
        ),
        row("Quality and the learning loop"),
        timeseries(
            "Success share by tier and model (feedback, 1 h)",
            [
                target(
                    f'sum by (tier, model) (increase(qlp_feedback_total{{outcome="success", {t}}}[1h]))'
                    f" / sum by (tier, model) (increase(qlp_feedback_total{{{t}}}[1h]))",
                    "{{tier}} {{model}}",
                )
            ],
            "percentunit",
            maxv=1,
            desc="Share of the feedback outcomes posted to POST /v1/feedback that were success, per request the "
            "feedback covers. Per rollout arm, with confidence intervals, cost and latency: "
            "`qlp report` / GET /v1/report (docs/report.md).",
        ),
        timeseries(
            "Feedback outcomes/s by tier, model and outcome",
            [
                target(
                    f"sum by (tier, model, outcome) (rate(qlp_feedback_total{{{t}}}[$__rate_interval]))",
                    "{{tier}} {{model}} {{outcome}}",
                )
            ],
            "short",
        ),
        timeseries(
            "Captured exchanges/s by tier and outcome",
            [
                target(
                    f"sum by (tier, outcome) (rate(qlp_capture_total{{{t}}}[$__rate_interval]))", "{{tier}} {{outcome}}"
                )
            ],
            "short",
            desc="Training data captured for the learning loop (docs/capture.md): captured, too_large, "
            "dropped (queue full), failed (no whole reply, or Redis unreachable).",
        ),
        timeseries(
            "Shadow requests/s by tier, backend and result",
            [
                target(
                    f"sum by (tier, backend, result) (rate(qlp_shadow_requests_total{{{t}}}[$__rate_interval]))",
                    "{{tier}} {{backend}} {{result}}",
                )
            ],
            "short",
            desc="Requests mirrored to another tier for comparison (docs/rollout.md), never billed to tenants; "
            "their cost is in the shadow ledger, qlp report's shadow section.",
        ),
    ]
    return dashboard(
        "qlp-cost",
        "QLP / Cost",
        "What the fleet costs, what the same tokens would have cost on GPT-4, the budget, and the "
        "quality and training data of the learning loop.",
        panels,
        [TIER],
    )


# -- Model servers -------------------------------------------------------------------------------------------


def model_servers() -> dict[str, Any]:
    s = 'job=~"$job", tier=~"$tier"'
    panels = [
        stat("Running requests", f"sum(vllm:num_requests_running{{{s}}})", "none"),
        stat(
            "Waiting requests",
            f"sum(vllm:num_requests_waiting{{{s}}})",
            "none",
            steps=[(None, "green"), (1, "orange"), (16, "red")],
        ),
        stat("Generation tokens/s", f"sum(rate(vllm:generation_tokens_total{{{s}}}[$__rate_interval]))", "short"),
        stat(
            "KV cache use (max)",
            f"max({KV % {'sel': s}})",
            "percentunit",
            decimals=1,
            steps=[(None, "green"), (0.8, "orange"), (0.95, "red")],
        ),
        row("Load"),
        timeseries(
            "Running requests",
            [target(f"sum by (tier, instance) (vllm:num_requests_running{{{s}}})", "{{tier}} {{instance}}")],
            "none",
        ),
        timeseries(
            "Waiting requests",
            [target(f"sum by (tier, instance) (vllm:num_requests_waiting{{{s}}})", "{{tier}} {{instance}}")],
            "none",
            desc="Admitted but not yet in a batch: the server is saturated.",
        ),
        timeseries(
            "Tokens/s",
            [
                target(f"sum by (tier) (rate(vllm:prompt_tokens_total{{{s}}}[$__rate_interval]))", "{{tier}} prompt"),
                target(
                    f"sum by (tier) (rate(vllm:generation_tokens_total{{{s}}}[$__rate_interval]))",
                    "{{tier}} generation",
                ),
            ],
            "short",
        ),
        timeseries(
            "KV cache use",
            [target(f"max by (tier, instance) ({KV % {'sel': s}})", "{{tier}} {{instance}}")],
            "percentunit",
            maxv=1,
            lines=[(0.95, "red")],
            desc="vllm:kv_cache_usage_perc (0..1).",
        ),
        row("Latency"),
        timeseries("Time to first token p50 / p95 / p99", quantiles("vllm:time_to_first_token_seconds", s), "s"),
        timeseries("End-to-end latency p50 / p95 / p99", quantiles("vllm:e2e_request_latency_seconds", s), "s"),
        timeseries(
            "Inter-token latency p50 / p95",
            [
                target(f"histogram_quantile({q}, sum by (tier, le) ({ITL % {'sel': s}}))", f"{{{{tier}}}} {n}")
                for q, n in ((0.5, "p50"), (0.95, "p95"))
            ],
            "s",
        ),
        timeseries(
            "Finished requests/s by reason",
            [
                target(
                    f"sum by (tier, finished_reason) (rate(vllm:request_success_total{{{s}}}[$__rate_interval]))",
                    "{{tier}} {{finished_reason}}",
                )
            ],
            "reqps",
        ),
        timeseries(
            "Generated tokens per request p50 / p95",
            [
                target(
                    f"histogram_quantile({q}, sum by (tier, le) "
                    f"(rate(vllm:request_generation_tokens_bucket{{{s}}}[$__rate_interval])))",
                    f"{{{{tier}}}} {n}",
                )
                for q, n in ((0.5, "p50"), (0.95, "p95"))
            ],
            "short",
        ),
        stat(
            "Scrape targets",
            f"min by (job, tier, instance) (up{{{s}}})",
            "none",
            w=12,
            h=8,
            legend="{{job}} {{tier}} {{instance}}",
            mappings=UP_MAPPINGS,
            steps=[(None, "red"), (1, "green")],
        ),
    ]
    return dashboard(
        "qlp-model-servers",
        "QLP / Model servers",
        "vLLM (GPU or CPU image) per tier: load, throughput, latency, KV cache, LoRA adapters.",
        panels,
        [
            variable("job", "Job", "label_values(vllm:num_requests_running, job)"),
            variable("tier", "Tier", 'label_values(vllm:num_requests_running{job=~"$job"}, tier)'),
        ],
    )


DASHBOARDS = {"fleet": fleet, "cost": cost, "model-servers": model_servers}


def build() -> dict[str, str]:
    """File name -> JSON text."""
    return {
        f"{name}.json": json.dumps(make(), indent=2, ensure_ascii=False) + "\n" for name, make in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a dashboard file is out of date")
    args = ap.parse_args(argv)
    stale = []
    for name, content in build().items():
        path = OUT / name
        if args.check:
            if not path.is_file() or path.read_text() != content:
                stale.append(name)
        else:
            path.write_text(content)
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name} and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
