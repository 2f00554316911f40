"""The ledger's Redis side: run the admission script, apply charges (one pipelined round trip per batch).

A `Charge` is everything needed to book one request, computed by the meter before Redis is involved, so
the same object can be applied now, or written to the spool and applied later with the same result.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from gateway.metering.layout import KeyKeys
from gateway.metering.pipe import Command, Connection, RedisPipe
from gateway.metering.scripts import ADMIT, CHARGE, Script

__all__ = ["SEP", "AdmitResult", "Charge", "Ledger", "LedgerPolicy", "calendar_of"]

_DAY = 86_400
SEP = "\x1f"  # separates tier, model, agent and workflow in a counter field
# Error replies that say "not now" rather than "never": the charges go to the spool and are replayed.
# (OOM: a Redis at its memory limit with noeviction, as services/redis/redis.conf configures it.)
TRANSIENT = ("OOM", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "NOREPLICAS", "LOADING")


@functools.lru_cache(maxsize=16)
def _calendar(day_no: int) -> tuple[str, str, int, int]:
    t = time.gmtime(day_no * _DAY)
    y, m = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return (time.strftime("%Y%m%d", t), time.strftime("%Y%m", t), (day_no + 1) * _DAY,
            calendar.timegm((y, m, 1, 0, 0, 0, 0, 0, 0)))


def calendar_of(ts_ms: int) -> tuple[str, str, int, int]:
    """(UTC day YYYYMMDD, month YYYYMM, end of that day and of that month in epoch seconds)."""
    return _calendar(ts_ms // 1000 // _DAY)


@dataclass(frozen=True, slots=True)
class LedgerPolicy:
    """Retention and sizes, from the settings."""

    stream_maxlen: int = 1_000_000
    ledger_days: int = 400
    idempotency_days: int = 3
    request_index_days: int = 30


@dataclass(slots=True)
class Charge:
    """One request's booking. `record` is None when nothing was served: only the key's state is corrected
    (reservation released, tokens given back)."""

    id: str  # the charge id: unique per handled request, the idempotency key
    ts_ms: int  # request start, wall clock: decides the UTC day and month booked
    tenant: str
    key_id: str  # whose slot it is booked in
    key_state: bool = True  # the key has a budget or a tokens/min limit whose state is corrected
    reserved_micros: int = 0  # the reservation made at admission (released by the charge)
    cost_micros: int = 0
    token_delta: int = 0  # actual tokens - tokens counted in the rate window at admission
    minute: int = 0  # the rate window the request was admitted in
    record: dict[str, Any] | None = None
    group: str = ""  # tier, backend/model, agent, workflow joined by SEP

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Charge:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class AdmitResult:
    code: int  # 0 ok, 1 unknown, 2 revoked, 3 requests/min, 4 tokens/min, 5 budget
    tenant: str = ""
    role: str = "user"
    flags: int = 0  # 1: the key has a budget, 2: a tokens/min limit
    retry_after: int = 0
    period: str = ""


class Ledger:
    def __init__(self, pipe: RedisPipe, policy: LedgerPolicy) -> None:
        self.pipe = pipe
        self.policy = policy

    async def load_scripts(self) -> None:
        for reply in await self.pipe.execute([("SCRIPT", "LOAD", s.source) for s in (ADMIT, CHARGE)]):
            if isinstance(reply, Exception):
                raise reply

    async def _eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted (or flushed its script cache): load and run once more
            await self.load_scripts()
            return await self.pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def admit(self, sha256: str, key_id: str, charge_id: str, worst_micros: int, worst_tokens: int,
                    now_ms: int, reservation_ttl_ms: int) -> AdmitResult:
        k = KeyKeys(key_id)
        minute = now_ms // 60_000
        now_s = now_ms // 1000
        day, month, day_end, month_end = calendar_of(now_ms)
        keys = [k.record, k.window(minute), k.window(minute - 1), k.reservations]
        r = await self._eval(ADMIT, keys, [sha256, charge_id, worst_micros, worst_tokens, now_ms, reservation_ttl_ms,
                                           day_end - now_s, month_end - now_s, day, month])
        code = int(r[0])
        if code == 0:
            return AdmitResult(0, r[1].decode(), r[2].decode() if r[2] else "user", int(r[3]))
        if code in (3, 4):
            return AdmitResult(code, retry_after=int(r[1]))
        if code == 5:
            return AdmitResult(5, retry_after=int(r[1]), period=r[2].decode())
        return AdmitResult(code)

    def _command(self, c: Charge) -> Command:
        p = self.policy
        day, month, _, _ = calendar_of(c.ts_ms)
        k = KeyKeys(c.key_id)
        r = c.record
        wf = (r.get("workflow") or "") if r is not None else ""
        resv = f"{c.id}:{c.reserved_micros}" if c.reserved_micros else ""
        rid = (r.get("request_id") or "") if r is not None else ""
        head = ("EVALSHA", CHARGE.sha, 8, k.done(day), k.record, k.reservations, k.window(c.minute), k.counters(day),
                k.stream, k.workflow_records(wf), k.request(rid), c.id, c.cost_micros, c.token_delta, p.idempotency_days * _DAY,
                1 if c.key_state else 0, resv, c.reserved_micros, day, month, p.ledger_days * _DAY, p.stream_maxlen)
        if r is None:
            return (*head, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
        return (*head, orjson.dumps(r), c.group, 1 if wf else 0, 1, r["prompt_tokens"], r["completion_tokens"],
                r["cost_micros"], r["reference_cost_micros"], 1 if r["estimated"] else 0, p.request_index_days * _DAY)

    async def apply(self, charges: list[Charge]) -> list[int | Exception]:
        """Apply charges in one round trip. Per charge: 1 booked now, 0 booked before (a replay), or the
        error a script answered with. A lost connection or a timeout raises: which charges were applied
        is then unknown, and applying them again is safe."""
        return await self.send(charges, await self.pipe.connection())

    def send(self, charges: list[Charge], conn: Connection) -> Coroutine[Any, Any, list[int | Exception]]:
        """Queue the charges' commands on `conn` now (they go out with its next write); the returned
        coroutine waits for the replies, as `apply`."""
        cmds = [self._command(c) for c in charges]
        return self._collect(cmds, [conn.send(c) for c in cmds])

    async def _collect(self, cmds: list[Command], futs: list[asyncio.Future[Any]]) -> list[int | Exception]:
        results: list[Any] = []
        for f in futs:  # replies arrive together: one wake-up, then the rest are done already
            try:
                results.append(await f)
            except (ConnectionError, TimeoutError):
                for rest in futs:  # all failed with the connection: mark their errors as seen
                    if rest.done() and not rest.cancelled():
                        rest.exception()
                raise
            except ResponseError as exc:
                results.append(exc)
        if any(isinstance(r, NoScriptError) for r in results):
            await self.load_scripts()  # the scripts that ran were idempotent; run them all again
            results = await self.pipe.execute(cmds)
        transient = next((r for r in results if isinstance(r, ResponseError) and str(r).startswith(TRANSIENT)), None)
        if transient is not None:
            raise transient
        return [r if isinstance(r, Exception) else int(r) for r in results]
