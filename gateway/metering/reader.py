"""Reading the ledger: summaries from the daily counters, workflows, and record export from the streams.

A tenant's ledger is the union of its keys' (gateway/metering/layout.py). Summaries are exact and cheap:
they add up per-key, per-day counter hashes (one HGETALL each, pipelined), so ranges are whole UTC days.
Each counter field is one combination of tier, model, agent and workflow (scripts.py, CHARGE); grouping by
one of them adds the combinations up here. Record-level questions (a workflow's requests, an export) read
the records.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any, Literal, get_args

import orjson
from redis.asyncio import Redis

from gateway.metering.keys import KeyStore
from gateway.metering.layout import KeyKeys
from gateway.metering.ledger import SEP
from gateway.metering.pricing import usd

__all__ = ["GROUPS", "MAX_DAYS", "GroupBy", "export", "parse_day", "summary", "with_time", "workflow"]

GroupBy = Literal["tier", "model", "agent", "workflow", "day", "tenant", "key"]
GROUPS: tuple[str, ...] = get_args(GroupBy)
MAX_DAYS = 366
METRICS = {
    "req": "requests",
    "pt": "prompt_tokens",
    "ct": "completion_tokens",
    "cost": "cost_micros",
    "ref": "reference_cost_micros",
    "est": "estimated_requests",
}
_RECORD_METRICS = ("prompt_tokens", "completion_tokens", "cost_micros", "reference_cost_micros")
_PART = {"tier": 0, "model": 1, "agent": 2, "workflow": 3}
NONE = "(none)"  # requests without an agent or workflow


def parse_day(value: str | None, default: dt.date) -> dt.date:
    if value is None or value == "":
        return default
    return dt.date.fromisoformat(value)


def _days(since: dt.date, until: dt.date) -> list[dt.date]:
    if until < since:
        raise ValueError("'until' is before 'since'")
    n = (until - since).days + 1
    if n > MAX_DAYS:
        raise ValueError(f"a summary covers at most {MAX_DAYS} days")
    return [since + dt.timedelta(days=i) for i in range(n)]


def _empty() -> dict[str, int]:
    return dict.fromkeys(METRICS.values(), 0)


def _row(group: str, m: dict[str, int]) -> dict[str, Any]:
    saved = m["reference_cost_micros"] - m["cost_micros"]
    return {
        "group": group,
        **m,
        "savings_micros": saved,
        "cost_usd": usd(m["cost_micros"]),
        "reference_cost_usd": usd(m["reference_cost_micros"]),
        "savings_usd": usd(saved),
    }


async def _keys_of(redis: Redis, tenants: list[str]) -> list[tuple[str, str]]:
    store = KeyStore(redis)
    return [(t, k) for t in tenants for k in await store.key_ids(t)]


async def summary(
    redis: Redis, tenants: list[str], group_by: GroupBy, since: dt.date, until: dt.date
) -> dict[str, Any]:
    days = _days(since, until)
    keys = await _keys_of(redis, tenants)
    async with redis.pipeline(transaction=False) as p:
        for _, k in keys:
            for d in days:
                p.hgetall(KeyKeys(k).counters(d.strftime("%Y%m%d")))
        hashes = await p.execute()
    groups: dict[str, dict[str, int]] = {}
    total = _empty()
    i = 0
    for t, k in keys:
        for d in days:
            h: dict[bytes, bytes] = hashes[i]
            i += 1
            for raw_field, raw_value in h.items():
                parts = raw_field.decode().split(SEP)
                name = METRICS.get(parts[-1])
                if name is None or len(parts) != 5:
                    continue
                n = int(raw_value)
                total[name] += n
                if group_by == "day":
                    group = d.isoformat()
                elif group_by == "tenant":
                    group = t
                elif group_by == "key":
                    group = k
                else:
                    group = parts[_PART[group_by]] or NONE  # no agent or workflow given: "(none)"
                groups.setdefault(group, _empty())[name] += n
    rows = [_row(g, v) for g, v in sorted(groups.items())]
    return {
        "object": "ledger.summary",
        "group_by": group_by,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "tenants": tenants,
        "data": rows,
        "total": _row("total", total),
    }


def with_time(rec: dict[str, Any]) -> dict[str, Any]:
    """A record with its start time as ISO 8601 (UTC) next to the epoch milliseconds it is stored with."""
    ts = int(rec["ts"])
    stamp = dt.datetime.fromtimestamp(ts / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return {**rec, "time": f"{stamp}.{ts % 1000:03d}Z"}


async def workflow(redis: Redis, tenant: str, workflow_id: str) -> dict[str, Any] | None:
    """A workflow's totals and every request in it, oldest first; None when the tenant has none such."""
    key_ids = await KeyStore(redis).key_ids(tenant)
    async with redis.pipeline(transaction=False) as p:
        for k in key_ids:
            p.lrange(KeyKeys(k).workflow_records(workflow_id), 0, -1)
        lists: list[list[bytes]] = await p.execute()
    records = sorted((with_time(orjson.loads(r)) for raw in lists for r in raw), key=lambda r: (r["ts"], r["id"]))
    if not records:
        return None
    m = _empty()
    for rec in records:
        m["requests"] += 1
        m["estimated_requests"] += 1 if rec.get("estimated") else 0
        for name in _RECORD_METRICS:
            m[name] += int(rec.get(name) or 0)
    return {
        "object": "ledger.workflow",
        "id": workflow_id,
        "tenant": tenant,
        **_row(workflow_id, m),
        "records": records,
    }


async def export(
    redis: Redis, tenants: list[str], since: dt.date, until: dt.date, page: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Ledger records whose request started within [since, until] (UTC days), key by key."""
    lo = int(dt.datetime.combine(since, dt.time(), dt.UTC).timestamp() * 1000)
    hi = int(dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp() * 1000)
    for _, k in await _keys_of(redis, tenants):
        # A record is added after its request started (replays from the spool: much later), so stream ids
        # are at least the record's time, give or take clock skew between hosts: start an hour early.
        start = f"{max(lo - 3_600_000, 0)}-0"
        while True:
            entries: list[Any] = await redis.xrange(KeyKeys(k).stream, min=start, max="+", count=page) or []
            for _, fields in entries:
                rec = orjson.loads(fields[b"r"])
                if lo <= rec["ts"] < hi:
                    yield with_time(rec)
            if len(entries) < page:
                break
            start = "(" + bytes(entries[-1][0]).decode()
