"""The report read from Redis: arms, outcomes by tenant, the shadow stream, the day range and filters.

Ledger and shadow records are written here with XADD in the formats of the contracts (docs/metering.md,
gateway/rollout/shadow.py), so arms and shadow calls are covered whatever serves them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import orjson
import redis.asyncio as aredis

from gateway.feedback import keys as fb
from gateway.metering.layout import KeyKeys
from gateway.report import compute, reader
from gateway.rollout.shadow import SHADOW_STREAM
from tests.metered import create_key

DAY = dt.date(2025, 6, 10)
T = int(dt.datetime.combine(DAY, dt.time(12), dt.UTC).timestamp() * 1000)


def rec(i: int, key_id: str, tenant: str, **over: Any) -> dict[str, Any]:
    return {
        "id": f"c{i}",
        "request_id": f"r{i}",
        "ts": T + i,
        "tenant": tenant,
        "key_id": key_id,
        "workflow": None,
        "agent": "developer",
        "arm": "stable",
        "tier": "T0",
        "requested_tier": "T0",
        "backend": "a",
        "model": "dev-v1",
        "endpoint": "chat",
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_micros": 5 + i,
        "reference_cost_micros": 600,
        "latency_ms": 10 * i,
        "status": 200,
        "estimated": False,
        "attempts": 1,
        "fallback": ["T0"],
        **over,
    }


def shadow(i: int, tenant: str, **over: Any) -> dict[str, Any]:
    return {
        "id": f"s{i}",
        "request_id": f"r{i}",
        "ts": T + i,
        "tenant": tenant,
        "workflow": None,
        "agent": "developer",
        "source_tier": "T0",
        "tier": "T0",
        "backend": "a",
        "model": "dev-v2",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_micros": 2,
        "reference_cost_micros": 600,
        "latency_ms": 30 + i,
        "status": 200,
        **over,
    }


async def _write(
    url: str,
    ledger: dict[str, list[dict[str, Any]]],
    shadows: list[dict[str, Any]],
    outcomes: dict[str, dict[str, Any]],
) -> None:
    r = aredis.Redis.from_url(url)
    try:
        for key_id, recs in ledger.items():
            for x in recs:
                await r.xadd(KeyKeys(key_id).stream, {"r": orjson.dumps(x)})
        for s in shadows:
            await r.xadd(SHADOW_STREAM, {"r": orjson.dumps(s)})
        for k, v in outcomes.items():
            await r.set(k, orjson.dumps(v))
    finally:
        await r.aclose()


async def _load(url: str, sel: reader.Selection) -> dict[str, Any]:
    r = aredis.Redis.from_url(url)
    try:
        return await reader.load(r, sel)
    finally:
        await r.aclose()


def test_report_from_redis_has_arms_tenant_scoped_outcomes_and_the_shadow_section(redis_url) -> None:
    _, acme = create_key(redis_url, "acme")
    _, globex = create_key(redis_url, "globex")
    ours = [
        rec(1, acme.id, "acme"),
        rec(2, acme.id, "acme", arm="canary", model="dev-v2", workflow="w"),
        rec(3, acme.id, "acme", arm="canary", model="dev-v2", workflow="w"),
        rec(4, acme.id, "acme", ts=T - 86_400_000),
    ]  # the day before: outside the range
    theirs = [rec(1, globex.id, "globex")]  # same request id "r1", another tenant
    outcomes = {
        fb.request_key("acme", "r1"): {"outcome": "success", "score": None, "note": None, "ts": T},
        fb.workflow_key("acme", "w"): {"outcome": "failure", "score": None, "note": None, "ts": T},
        fb.request_key("globex", "r1"): {"outcome": "failure", "score": None, "note": None, "ts": T},
    }
    shadows = [
        shadow(1, "acme"),
        shadow(2, "acme", status=502),
        shadow(3, "globex"),
        shadow(4, "acme", ts=T + 86_400_000),
    ]  # the day after
    asyncio.run(_write(redis_url, {acme.id: ours, globex.id: theirs}, shadows, outcomes))

    rep = asyncio.run(_load(redis_url, reader.Selection(["acme"], DAY, DAY)))
    assert (
        rep["data"]
        == compute.build(
            ours[:3], {("acme", "r1"): {"outcome": "success"}}, {("acme", "w"): {"outcome": "failure"}}, shadows[:2]
        )["data"]
    )
    by_arm = {r["arm"]: r for r in rep["data"]}
    assert (by_arm["stable"]["successes"], by_arm["stable"]["feedback"]) == (1, 1)
    assert (by_arm["canary"]["successes"], by_arm["canary"]["feedback"], by_arm["canary"]["workflows"]) == (0, 2, 1)
    assert rep["shadow"] == [
        {
            "source_tier": "T0",
            "agent": "developer",
            "tier": "T0",
            "model": "dev-v2",
            "requests": 2,
            "errors": 1,
            "latency_p50_ms": 31,
            "latency_p95_ms": 32,
            "cost_micros": 4,
            "cost_usd": "0.000004",
        }
    ]
    assert rep["total"]["cost_micros"] == 6 + 7 + 8  # shadow calls are not billed

    both = asyncio.run(_load(redis_url, reader.Selection(["acme", "globex"], DAY - dt.timedelta(days=1), DAY)))
    assert both["total"]["requests"] == 5 and both["total"]["feedback"] == 4 and both["total"]["successes"] == 1
    filtered = asyncio.run(_load(redis_url, reader.Selection(["acme"], DAY, DAY, tier="T1")))
    assert filtered["data"] == [] and filtered["shadow"] == []
    empty = asyncio.run(_load(redis_url, reader.Selection(["acme"], DAY, DAY - dt.timedelta(days=1))))
    assert empty["total"]["requests"] == 0
    far = asyncio.run(_load(redis_url, reader.Selection(["acme"], dt.date.min, dt.date.max)))
    assert far["total"]["requests"] == 4
