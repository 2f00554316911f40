"""The report's arithmetic, pure: intervals, percentiles, per-workflow cost, savings, outcomes, zero cases."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.report import compute


def rec(i: int, **over: Any) -> dict[str, Any]:
    r = {
        "id": f"c{i}",
        "request_id": f"r{i}",
        "ts": 1_750_000_000_000 + i,
        "tenant": "acme",
        "workflow": None,
        "agent": "developer",
        "arm": None,
        "tier": "T0",
        "requested_tier": "T0",
        "backend": "a",
        "model": "m0",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_micros": 5,
        "reference_cost_micros": 600,
        "latency_ms": 100 + i,
        "status": 200,
    }
    return {**r, **over}


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (8, 10, 0.4902, 0.9433),  # the textbook example (Newcombe 1998, z = 1.96)
        (0, 10, 0.0, 0.2775),  # 0/n: the interval still has width (unlike the Wald interval)
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),  # Wikipedia's "Binomial proportion confidence interval" worked example
    ],
)
def test_wilson_interval_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = compute.wilson(k, n)
    assert got is not None
    assert got == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))


def test_wilson_interval_is_none_without_trials() -> None:
    assert compute.wilson(0, 0) is None


def test_nearest_rank_percentile_returns_an_observed_value() -> None:
    values = [50, 15, 40, 20, 35]  # Wikipedia's nearest-rank example
    assert [compute.nearest_rank(values, p) for p in (5, 30, 40, 50, 100)] == [15, 20, 20, 35, 50]
    assert compute.nearest_rank([7], 95) == 7 and compute.nearest_rank([], 50) is None
    assert compute.nearest_rank(list(range(1, 101)), 95) == 95


def test_money_per_request_rounds_half_up_and_stays_integer() -> None:
    assert compute.per(10, 4) == 3 and compute.per(9, 4) == 2 and compute.per(5, 0) is None


def test_request_feedback_overrides_its_workflows() -> None:
    r = rec(1, workflow="w")
    wf = {("acme", "w"): {"outcome": "success"}}
    assert compute.outcome_of(r, {}, wf) == "success"
    assert compute.outcome_of(r, {("acme", "r1"): {"outcome": "failure"}}, wf) == "failure"
    assert compute.outcome_of(r, {}, {("other", "w"): {"outcome": "success"}}) is None  # another tenant's


def test_groups_by_tier_agent_and_arm_with_exact_figures() -> None:
    records = [
        rec(1, workflow="w1", arm="canary", cost_micros=10, reference_cost_micros=100, latency_ms=10),
        rec(2, workflow="w1", arm="canary", cost_micros=20, reference_cost_micros=100, latency_ms=30),
        rec(3, workflow="w2", arm="canary", cost_micros=31, reference_cost_micros=100, latency_ms=20),
        rec(4, arm="canary", cost_micros=7, reference_cost_micros=100, latency_ms=1000),  # no workflow
        rec(5, cost_micros=50, reference_cost_micros=50),  # arm null -> "default"
        rec(6, agent=None, tier="T3", requested_tier="T3", cost_micros=600, reference_cost_micros=600),
    ]
    by_req = {("acme", "r3"): {"outcome": "failure"}, ("acme", "r4"): {"outcome": "success"}}
    by_wf = {("acme", "w1"): {"outcome": "success"}, ("acme", "w2"): {"outcome": "success"}}
    rep = compute.build(records, by_req, by_wf)
    keys = [(r["tier"], r["agent"], r["arm"]) for r in rep["data"]]
    assert keys == [("T0", "developer", "canary"), ("T0", "developer", "default"), ("T3", "(none)", "default")]
    canary = rep["data"][0]
    assert (canary["requests"], canary["workflows"], canary["feedback"], canary["successes"]) == (4, 2, 4, 3)
    assert canary["success_rate"] == 0.75 and canary["success_ci95"] == list(compute.wilson(3, 4) or ())
    assert (canary["latency_p50_ms"], canary["latency_p95_ms"]) == (20, 1000)
    assert canary["cost_micros"] == 68 and canary["cost_per_request_micros"] == 17
    assert canary["cost_per_workflow_micros"] == 31  # (10 + 20 + 31) / 2 workflows = 30.5 -> 31; r4 has none
    assert canary["counterfactual_micros"] == 400 and canary["saved_share"] == 1 - 68 / 400
    assert canary["cost_usd"] == "0.000068" and canary["saved_usd"] == "0.000332"
    default = rep["data"][1]
    assert default["feedback"] == 0 and default["success_rate"] is None and default["success_ci95"] is None
    assert default["cost_per_workflow_micros"] is None and default["cost_per_workflow_usd"] is None
    assert rep["data"][2]["saved_share"] == 0.0
    t0 = rep["tiers"][0]
    assert (t0["tier"], t0["requests"], t0["cost_micros"]) == ("T0", 5, 118)
    assert rep["total"]["requests"] == 6 and rep["total"]["cost_micros"] == 718
    assert rep["local"]["requests"] == 5 and rep["local"]["cost_share"] == 118 / 450


def test_empty_and_zero_counterfactual_give_nulls_not_errors() -> None:
    rep = compute.build([], {}, {})
    assert rep["data"] == [] and rep["total"]["requests"] == 0
    assert rep["total"]["saved_share"] is None and rep["total"]["latency_p50_ms"] is None
    assert rep["local"]["cost_share"] is None
    rep = compute.build([rec(1, cost_micros=0, reference_cost_micros=0)], {}, {})
    assert rep["data"][0]["saved_share"] is None and rep["data"][0]["cost_per_request_micros"] == 0


def test_shadow_section_is_per_source_agent_and_target_and_not_in_the_totals() -> None:
    shadow = [
        {
            "source_tier": "T3",
            "agent": "developer",
            "tier": "T0",
            "model": "dev-v2",
            "latency_ms": 40,
            "cost_micros": 3,
            "status": 200,
        },
        {
            "source_tier": "T3",
            "agent": "developer",
            "tier": "T0",
            "model": "dev-v2",
            "latency_ms": 60,
            "cost_micros": 4,
            "status": 502,
        },
        {
            "source_tier": "T3",
            "agent": None,
            "tier": "T1",
            "model": "m1",
            "latency_ms": 9,
            "cost_micros": 1,
            "status": 200,
        },
    ]
    rep = compute.build([rec(1)], {}, {}, shadow)
    assert [(s["source_tier"], s["agent"], s["tier"], s["model"]) for s in rep["shadow"]] == [
        ("T3", "(none)", "T1", "m1"),
        ("T3", "developer", "T0", "dev-v2"),
    ]
    dev = rep["shadow"][1]
    assert (dev["requests"], dev["errors"], dev["latency_p50_ms"], dev["latency_p95_ms"]) == (2, 1, 40, 60)
    assert dev["cost_micros"] == 7 and dev["cost_usd"] == "0.000007"
    assert rep["total"]["requests"] == 1 and rep["total"]["cost_micros"] == 5
