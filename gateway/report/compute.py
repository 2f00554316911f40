"""The report's figures: a pure function of ledger records, feedback outcomes and shadow records.

No I/O here (reader.py fetches, render.py draws), so every figure can be checked against records a test
writes itself. Definitions (docs/report.md has them as formulas):

* groups: (requested tier, agent or "(none)", arm or "default"); totals per requested tier and overall;
* a record's outcome: its request's feedback, else its workflow's, else unknown (feedback/keys.py);
* success rate: successes / records with an outcome, with a 95% Wilson score interval;
* latency: p50 and p95 of `latency_ms`, nearest rank (an observed value, never interpolated);
* money: integer micro-dollars; per-request and per-workflow costs are rounded half up to a micro-dollar;
* saved share: 1 - cost / counterfactual, where the counterfactual is what GPT-4 (the reference T3
  model) would have cost for the same tokens (`reference_cost_micros`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.metering.pricing import usd

__all__ = ["NO_AGENT", "NO_ARM", "Z95", "build", "nearest_rank", "outcome_of", "per", "wilson"]

NO_AGENT = "(none)"
NO_ARM = "default"
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
Outcomes = Mapping[tuple[str, str], Mapping[str, Any]]  # (tenant, request or workflow id) -> stored feedback


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (None without trials). Unlike p ± z·se it stays
    within [0, 1] and is honest at 0/n and n/n, which small arms hit often."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def nearest_rank(values: list[int], pct: float) -> int | None:
    """The pct-th percentile by nearest rank: the smallest value with at least pct% of values at or below
    it (sorted[ceil(pct/100 · n) - 1]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(s)))
    return s[rank - 1]


def per(total: int, n: int) -> int | None:
    """total / n rounded half up to an integer (micro-dollars stay integers); None when n is 0."""
    return (2 * total + n) // (2 * n) if n > 0 else None


def outcome_of(rec: Mapping[str, Any], by_request: Outcomes, by_workflow: Outcomes) -> str | None:
    """ "success" | "failure" | None: the request's own feedback, else its workflow's, else unknown."""
    tenant = str(rec.get("tenant"))
    own = by_request.get((tenant, str(rec.get("request_id"))))
    if own is None and rec.get("workflow"):
        own = by_workflow.get((tenant, str(rec["workflow"])))
    return None if own is None else str(own.get("outcome"))


def _ok(status: Any) -> bool:
    return isinstance(status, int) and 200 <= status < 300


def _usd(micros: int | None) -> str | None:
    return None if micros is None else usd(micros)


def _figures(recs: list[dict[str, Any]], outcomes: list[str | None]) -> dict[str, Any]:
    n = len(recs)
    cost = sum(int(r.get("cost_micros") or 0) for r in recs)
    ref = sum(int(r.get("reference_cost_micros") or 0) for r in recs)
    workflows = {(r.get("tenant"), r["workflow"]) for r in recs if r.get("workflow")}
    wf_cost = sum(int(r.get("cost_micros") or 0) for r in recs if r.get("workflow"))
    known = [o for o in outcomes if o is not None]
    wins = sum(1 for o in known if o == "success")
    ci = wilson(wins, len(known))
    latencies = [int(r.get("latency_ms") or 0) for r in recs]
    per_request, per_workflow = per(cost, n), per(wf_cost, len(workflows))
    return {
        "requests": n,
        "workflows": len(workflows),
        "errors": sum(1 for r in recs if not _ok(r.get("status"))),
        "fallbacks": sum(1 for r in recs if r.get("tier") != r.get("requested_tier")),
        "feedback": len(known),
        "successes": wins,
        "success_rate": wins / len(known) if known else None,
        "success_ci95": list(ci) if ci is not None else None,
        "latency_p50_ms": nearest_rank(latencies, 50),
        "latency_p95_ms": nearest_rank(latencies, 95),
        "cost_micros": cost,
        "cost_per_request_micros": per_request,
        "cost_per_workflow_micros": per_workflow,
        "counterfactual_micros": ref,
        "counterfactual_per_request_micros": per(ref, n),
        "saved_micros": ref - cost,
        "saved_share": 1 - cost / ref if ref else None,
        "cost_usd": usd(cost),
        "cost_per_request_usd": _usd(per_request),
        "cost_per_workflow_usd": _usd(per_workflow),
        "counterfactual_usd": usd(ref),
        "saved_usd": usd(ref - cost),
    }


def _grouped(
    items: Iterable[tuple[dict[str, Any], str | None]], key: Callable[[dict[str, Any]], tuple[str, ...]]
) -> dict[tuple[str, ...], tuple[list[dict[str, Any]], list[str | None]]]:
    groups: dict[tuple[str, ...], tuple[list[dict[str, Any]], list[str | None]]] = {}
    for rec, out in items:
        recs, outs = groups.setdefault(key(rec), ([], []))
        recs.append(rec)
        outs.append(out)
    return dict(sorted(groups.items()))


def _shadow(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shadow calls per (source tier, agent, tier, model): what mirroring traffic cost us, and how fast."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        k = (str(r.get("source_tier")), r.get("agent") or NO_AGENT, str(r.get("tier")), str(r.get("model")))
        groups.setdefault(k, []).append(r)
    rows = []
    for (source, agent, tier, model), recs in sorted(groups.items()):
        cost = sum(int(r.get("cost_micros") or 0) for r in recs)
        latencies = [int(r.get("latency_ms") or 0) for r in recs]
        rows.append(
            {
                "source_tier": source,
                "agent": agent,
                "tier": tier,
                "model": model,
                "requests": len(recs),
                "errors": sum(1 for r in recs if not _ok(r.get("status"))),
                "latency_p50_ms": nearest_rank(latencies, 50),
                "latency_p95_ms": nearest_rank(latencies, 95),
                "cost_micros": cost,
                "cost_usd": usd(cost),
            }
        )
    return rows


def build(
    records: Iterable[dict[str, Any]],
    by_request: Outcomes,
    by_workflow: Outcomes,
    shadow: Iterable[dict[str, Any]] = (),
    *,
    external_tiers: frozenset[str] = frozenset({"T3"}),
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of these ledger records (already selected: tenants, days, filters), their outcomes keyed
    by (tenant, id), and the shadow records of the same selection."""
    items = [(r, outcome_of(r, by_request, by_workflow)) for r in records]
    rows = [
        {"tier": k[0], "agent": k[1], "arm": k[2], **_figures(*v)}
        for k, v in _grouped(
            items, lambda r: (str(r.get("requested_tier")), r.get("agent") or NO_AGENT, r.get("arm") or NO_ARM)
        ).items()
    ]
    tiers = [
        {"tier": k[0], **_figures(*v)} for k, v in _grouped(items, lambda r: (str(r.get("requested_tier")),)).items()
    ]
    local = [(r, o) for r, o in items if r.get("tier") not in external_tiers]
    local_fig = _figures([r for r, _ in local], [o for _, o in local])
    total = _figures([r for r, _ in items], [o for _, o in items])
    return {
        "object": "report",
        **(meta or {}),
        "data": rows,
        "tiers": tiers,
        "total": total,
        # Served by a local tier (not external): their cost as a share of the counterfactual.
        "local": {
            "requests": local_fig["requests"],
            "cost_micros": local_fig["cost_micros"],
            "counterfactual_micros": local_fig["counterfactual_micros"],
            "cost_share": (
                local_fig["cost_micros"] / local_fig["counterfactual_micros"]
                if local_fig["counterfactual_micros"]
                else None
            ),
            "success_rate": local_fig["success_rate"],
            "success_ci95": local_fig["success_ci95"],
        },
        "shadow": _shadow(shadow),
    }
