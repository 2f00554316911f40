"""Feedback in Redis: find what an id names in the ledger, store outcomes, and read them back in batches.

The route (routes.py) decides who may write; this module only reads and writes keys (keys.py has the
layout). Finding a request costs two round trips whatever the number of the tenant's keys: one pipelined
GET of the request index in each key's slot, then one pipelined XRANGE of the entries found. A workflow is
one pipelined LRANGE of its record list in each key's slot.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from gateway.feedback.keys import log_key, request_key, workflow_key
from gateway.metering.keys import KeyStore
from gateway.metering.layout import KeyKeys, day_of

__all__ = ["LOG_MAXLEN", "MGET_BATCH", "Outcome", "find_request", "find_workflow", "outcomes", "save"]

Outcome = Literal["success", "failure"]
LOG_MAXLEN = 100_000  # feedback events kept per tenant (XADD MAXLEN ~): an audit trail, not the truth
MGET_BATCH = 500  # outcome keys per MGET: bounded replies, bounded Redis pauses


async def find_request(redis: Redis, tenant: str, request_id: str, days: int) -> dict[str, Any] | None:
    """The tenant's ledger record of `request_id` (the latest one when several keys used the same id), among
    the requests booked in the last `days` UTC days (the request index is one hash per key and day)."""
    key_ids = await KeyStore(redis).key_ids(tenant)
    now_ms = time.time_ns() // 1_000_000
    # Newest first; tomorrow too: a gateway whose clock is ahead may have booked it under that day.
    dates = [day_of(now_ms - i * 86_400_000) for i in range(-1, days + 1)]
    async with redis.pipeline(transaction=False) as p:
        for k in key_ids:
            kk = KeyKeys(k)
            for d in dates:
                p.hget(kk.requests(d), request_id)
            p.get(kk.request(request_id))  # the index as it was kept before (one key per request)
        entry_ids: list[bytes | None] = await p.execute()
    per_key = len(dates) + 1
    found = []
    for i, k in enumerate(key_ids):
        latest = next((e for e in entry_ids[i * per_key : (i + 1) * per_key] if e), None)  # newest day first
        if latest is not None:
            found.append((k, latest))
    if not found:
        return None
    async with redis.pipeline(transaction=False) as p:
        for k, e in found:
            p.xrange(KeyKeys(k).stream, min=e, max=e)
        ranges: list[list[Any]] = await p.execute()
    records = [orjson.loads(fields[b"r"]) for entries in ranges for _, fields in entries]
    # The stream may have been trimmed past an indexed entry: then the request is gone from the ledger.
    return max(records, key=lambda r: (r["ts"], r["id"])) if records else None


async def find_workflow(redis: Redis, tenant: str, workflow: str) -> list[dict[str, Any]]:
    """Every ledger record of the tenant's workflow (empty: no such workflow)."""
    key_ids = await KeyStore(redis).key_ids(tenant)
    async with redis.pipeline(transaction=False) as p:
        for k in key_ids:
            p.lrange(KeyKeys(k).workflow_records(workflow), 0, -1)
        lists: list[list[bytes]] = await p.execute()
    return [orjson.loads(raw) for lst in lists for raw in lst]


async def save(
    redis: Redis,
    tenant: str,
    *,
    request_id: str | None,
    workflow_id: str | None,
    value: dict[str, Any],
    applied_to: int,
    ttl_s: int,
) -> None:
    """Store the latest outcome of a request or a workflow (overwriting any earlier one) and log the event."""
    key = request_key(tenant, request_id) if request_id is not None else workflow_key(tenant, workflow_id or "")
    event = {**value, "request_id": request_id, "workflow_id": workflow_id, "applied_to": applied_to}
    async with redis.pipeline(transaction=False) as p:  # one slot ({t:<tenant>}): fine on a cluster
        p.set(key, orjson.dumps(value), ex=ttl_s)
        p.xadd(log_key(tenant), {"r": orjson.dumps(event)}, maxlen=LOG_MAXLEN, approximate=True)
        await p.execute()


def _chunks(keys: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(keys), n):
        yield keys[i : i + n]


async def outcomes(
    redis: Redis, tenant: str, request_ids: Iterable[str], workflows: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The stored feedback of these requests and workflows of one tenant: (by request id, by workflow id)."""
    rids, wfs = sorted(set(request_ids)), sorted(set(workflows))
    keys = [request_key(tenant, r) for r in rids] + [workflow_key(tenant, w) for w in wfs]
    values: list[Any] = []
    for chunk in _chunks(keys, MGET_BATCH):
        values.extend(await redis.mget(chunk))
    by_request = {r: orjson.loads(v) for r, v in zip(rids, values[: len(rids)], strict=True) if v}
    by_workflow = {w: orjson.loads(v) for w, v in zip(wfs, values[len(rids) :], strict=True) if v}
    return by_request, by_workflow
