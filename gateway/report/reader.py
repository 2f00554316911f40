"""Fetching what the report is computed from: ledger records, their feedback, and shadow records.

Records come from the ledger streams (`gateway.metering.reader.export`, the same reader as `qlp ledger
export`), so the report and an export always agree. Outcomes are read with MGET in batches, per tenant
(their keys share the tenant's slot). Shadow records come from the one shadow stream, which is never billed
to anyone; they are selected by the same tenants, days and filters.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway.config import FleetConfig, Kind
from gateway.feedback import store
from gateway.metering.reader import export
from gateway.report import compute
from gateway.rollout.shadow import SHADOW_STREAM

__all__ = ["Selection", "external_tiers", "load", "shadow_records"]

_PAGE = 1000
_HOUR_MS = 3_600_000


class Selection:
    """What a report covers: tenants, whole UTC days [since, until], and optional tier and agent filters
    (the requested tier; for shadow records, their source tier). An empty range selects nothing."""

    __slots__ = ("agent", "since", "tenants", "tier", "until")

    def __init__(
        self, tenants: list[str], since: dt.date, until: dt.date, tier: str | None = None, agent: str | None = None
    ) -> None:
        self.tenants, self.since, self.tier, self.agent = tenants, since, tier, agent
        self.until = min(until, dt.date.max - dt.timedelta(days=1))  # the range's end is the next midnight

    @property
    def empty(self) -> bool:
        return self.until < self.since

    def bounds_ms(self) -> tuple[int, int]:
        lo = dt.datetime.combine(self.since, dt.time(), dt.UTC).timestamp()
        hi = dt.datetime.combine(self.until + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()
        return int(lo * 1000), int(hi * 1000)

    def wants(self, rec: dict[str, Any], tier_field: str) -> bool:
        return (self.tier is None or rec.get(tier_field) == self.tier) and (
            self.agent is None or (rec.get("agent") or compute.NO_AGENT) == self.agent
        )

    def meta(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "tenants": self.tenants,
            "tier": self.tier,
            "agent": self.agent,
        }


async def shadow_records(redis: Redis, sel: Selection) -> AsyncIterator[dict[str, Any]]:
    """Shadow records of the selection (oldest first)."""
    lo, hi = sel.bounds_ms()
    tenants = set(sel.tenants)
    start = f"{max(lo - _HOUR_MS, 0)}-0"  # entries are added after their request started: start early
    while True:
        entries: list[Any] = await redis.xrange(SHADOW_STREAM, min=start, max="+", count=_PAGE) or []
        for _, fields in entries:
            rec = orjson.loads(fields[b"r"])
            if lo <= int(rec.get("ts") or 0) < hi and rec.get("tenant") in tenants and sel.wants(rec, "source_tier"):
                yield rec
        if len(entries) < _PAGE:
            return
        start = "(" + bytes(entries[-1][0]).decode()


def external_tiers(config: FleetConfig | None) -> frozenset[str]:
    """The tiers served by external providers (the rest are local: the report's "local" share)."""
    if config is None:
        return frozenset({"T3"})
    return frozenset(name for name, tier in config.tiers.items() if tier.kind is not Kind.LOCAL)


async def load(redis: Redis, sel: Selection, external: frozenset[str] = frozenset({"T3"})) -> dict[str, Any]:
    """The report of a selection (compute.build over what is in Redis now); `external`: external_tiers()."""
    if sel.empty:
        return compute.build([], {}, {}, external_tiers=external, meta=sel.meta())
    records = [r async for r in export(redis, sel.tenants, sel.since, sel.until) if sel.wants(r, "requested_tier")]
    by_request: dict[tuple[str, str], dict[str, Any]] = {}
    by_workflow: dict[tuple[str, str], dict[str, Any]] = {}
    for tenant in sel.tenants:
        mine = [r for r in records if r.get("tenant") == tenant]
        if not mine:
            continue
        rq, wf = await store.outcomes(
            redis,
            tenant,
            (str(r.get("request_id")) for r in mine),
            (str(r["workflow"]) for r in mine if r.get("workflow")),
        )
        by_request.update(((tenant, k), v) for k, v in rq.items())
        by_workflow.update(((tenant, k), v) for k, v in wf.items())
    shadow = [r async for r in shadow_records(redis, sel)]
    return compute.build(records, by_request, by_workflow, shadow, external_tiers=external, meta=sel.meta())
