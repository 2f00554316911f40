"""Export captured exchanges as the trainer's JSONL, with feedback outcomes joined (docs/capture.md).

Reads `qlp:capture:<agent>` streams (one agent, or every one found by SCAN), keeps the records in a time
range (stream ids are millisecond timestamps, so the range is an XRANGE bound, not a filter), of a tenant,
and of an outcome. A record's outcome is its request's feedback, else its workflow's, else null
(gateway/feedback/keys.py); it is looked up at export time because feedback arrives after the capture.
Redaction is applied again (patterns added since the capture apply to old records). The file is written
to a temporary sibling and renamed into place: a reader never sees half an export.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from redis.asyncio import Redis

from gateway.capture.capture import AGENT_RE, STREAM_PREFIX, stream_key
from gateway.capture.record import normalise_messages
from gateway.capture.redact import Redactor
from gateway.feedback.keys import request_key, workflow_key

__all__ = ["OUTCOMES", "ExportStats", "Outcome", "agents", "export", "read_records", "stream_stats"]

Outcome = Literal["success", "failure", "unknown", "any"]
OUTCOMES: tuple[Outcome, ...] = ("success", "failure", "unknown", "any")
PAGE = 500  # records per XRANGE page and per feedback MGET batch
VALID_OUTCOMES = frozenset({"success", "failure"})


@dataclass
class ExportStats:
    streams: int = 0
    read: int = 0
    written: int = 0
    success: int = 0
    failure: int = 0
    unknown: int = 0
    other_tenant: int = 0
    other_outcome: int = 0
    invalid: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


async def agents(redis: Redis) -> list[str]:
    """Agents that have a capture stream."""
    found = set()
    async for raw in redis.scan_iter(match=STREAM_PREFIX + "*", count=500, _type="STREAM"):
        name = (raw.decode() if isinstance(raw, bytes) else str(raw))[len(STREAM_PREFIX) :]
        if AGENT_RE.fullmatch(name):
            found.add(name)
    return sorted(found)


async def stream_stats(redis: Redis) -> list[dict[str, Any]]:
    """Per agent stream: records kept, first and last record time (ms)."""
    out = []
    for agent in await agents(redis):
        key = stream_key(agent)
        n = await redis.xlen(key)
        first = await redis.xrange(key, count=1)
        last = await redis.xrevrange(key, count=1)
        out.append(
            {
                "agent": agent,
                "records": n,
                "first_ms": _id_ms(first[0][0]) if first else None,
                "last_ms": _id_ms(last[0][0]) if last else None,
            }
        )
    return out


def _id_ms(entry_id: Any) -> int:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-", 1)[0])


def _next_id(entry_id: Any) -> str:
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def read_records(
    redis: Redis, agent: str, since_ms: int | None = None, until_ms: int | None = None
) -> AsyncIterator[list[dict[str, Any] | None]]:
    """Pages of decoded records of one agent's stream (None for an entry that is not a record)."""
    key = stream_key(agent)
    lo = f"{since_ms}-0" if since_ms is not None else "-"
    hi = f"{until_ms}-18446744073709551615" if until_ms is not None else "+"
    while True:
        page = await redis.xrange(key, min=lo, max=hi, count=PAGE)
        if not page:
            return
        recs: list[dict[str, Any] | None] = []
        for _, fields in page:
            raw = (fields or {}).get(b"r")
            try:
                rec = json.loads(raw) if raw is not None else None
            except ValueError:
                rec = None
            recs.append(rec if isinstance(rec, dict) else None)
        yield recs
        if len(page) < PAGE:
            return
        lo = _next_id(page[-1][0])


def _feedback_outcome(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    outcome = doc.get("outcome") if isinstance(doc, dict) else None
    return outcome if outcome in VALID_OUTCOMES else None


async def _join_outcomes(redis: Redis, recs: list[dict[str, Any]]) -> None:
    """Set each record's `outcome` from feedback: its request's, else its workflow's, else None."""
    keys: list[str] = []
    slots: list[tuple[int, int | None]] = []  # per record: index of its request key, of its workflow key
    for rec in recs:
        tenant = rec.get("tenant")
        if not isinstance(tenant, str):
            slots.append((-1, None))
            continue
        keys.append(request_key(tenant, str(rec.get("request_id"))))
        ri = len(keys) - 1
        wi = None
        if isinstance(rec.get("workflow"), str):
            keys.append(workflow_key(tenant, rec["workflow"]))
            wi = len(keys) - 1
        slots.append((ri, wi))
    # One round trip per page: a pipeline of GETs rather than MGET, because the keys of different tenants
    # hash to different Redis Cluster slots and MGET needs them all in one.
    pipe = redis.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    values = await pipe.execute() if keys else []
    for rec, (ri, wi) in zip(recs, slots, strict=True):
        outcome = _feedback_outcome(values[ri]) if ri >= 0 else None
        if outcome is None and wi is not None:
            outcome = _feedback_outcome(values[wi])
        rec["outcome"] = outcome


def _clean(rec: dict[str, Any], redactor: Redactor) -> dict[str, Any] | None:
    """The record redacted again and checked against what the trainer requires, or None."""
    messages = normalise_messages(rec.get("messages"))
    if messages is None or not isinstance(rec.get("response"), str) or not isinstance(rec.get("agent"), str):
        return None
    return {**rec, "messages": redactor.obj(messages), "response": redactor.text(rec["response"])}


async def export(
    redis: Redis,
    output: Path,
    redactor: Redactor,
    agent: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    tenant: str | None = None,
    outcome: Outcome = "any",
) -> ExportStats:
    """Write the matching records to `output` (JSON lines, atomically); return the counts."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if agent is not None and not AGENT_RE.fullmatch(agent):
        raise ValueError(f"not an agent name: {agent!r}")
    stats = ExportStats()
    names = [agent] if agent is not None else await agents(redis)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for name in names:
                stats.streams += 1
                async for page in read_records(redis, name, since_ms, until_ms):
                    stats.read += len(page)
                    recs = [r for r in page if r is not None]
                    stats.invalid += len(page) - len(recs)
                    if tenant is not None:
                        stats.other_tenant += sum(1 for r in recs if r.get("tenant") != tenant)
                        recs = [r for r in recs if r.get("tenant") == tenant]
                    await _join_outcomes(redis, recs)
                    for rec in recs:
                        got = rec["outcome"] or "unknown"
                        if outcome != "any" and got != outcome:
                            stats.other_outcome += 1
                            continue
                        clean = _clean(rec, redactor)
                        if clean is None:
                            stats.invalid += 1
                            continue
                        setattr(stats, got, getattr(stats, got) + 1)
                        fh.write(json.dumps(clean, ensure_ascii=False) + "\n")
                        stats.written += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return stats
