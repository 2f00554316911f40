"""The ledger's Redis side: run the admission script, apply charges (one pipelined round trip per batch).

A `Charge` is everything needed to book one request, computed by the meter before Redis is involved, so
the same object can be applied now, or written to the spool and applied later with the same result.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from gateway.metering.layout import KeyKeys
from gateway.metering.pipe import Command, Link, Pipe
from gateway.metering.scripts import ADMIT, CHARGE, CHARGE_FIELDS

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
    return (
        time.strftime("%Y%m%d", t),
        time.strftime("%Y%m", t),
        (day_no + 1) * _DAY,
        calendar.timegm((y, m, 1, 0, 0, 0, 0, 0, 0)),
    )


def calendar_of(ts_ms: int) -> tuple[str, str, int, int]:
    """(UTC day YYYYMMDD, month YYYYMM, end of that day and of that month in epoch seconds)."""
    return _calendar(ts_ms // 1000 // _DAY)


# (sha256, charge or lease id, worst-case micro-dollars, worst-case tokens, now ms, requests wanted, the reply)
_Admission = tuple[str, str, int, int, int, int, "asyncio.Future[Any]"]


def _deliver(items: list[_Admission], reply: asyncio.Future[Any]) -> None:
    """Hand each admission of one ADMIT call its answer (or the call's error)."""
    exc = reply.exception() if not reply.cancelled() else ConnectionError("cancelled")
    for i, it in enumerate(items):
        fut = it[6]
        if fut.done():  # its caller was cancelled
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(reply.result()[i])


class _KeyList:
    """The KEYS of one script call, each key once; `pos` is a key's 1-based position (added if new)."""

    __slots__ = ("_at", "names")

    def __init__(self, first: list[str]) -> None:
        self.names = first
        self._at = {name: i + 1 for i, name in enumerate(first)}

    def pos(self, name: str) -> int:
        n = self._at.get(name)
        if n is None:
            self.names.append(name)
            n = self._at[name] = len(self.names)
        return n


class NotReplicated(ResponseError):
    """The charges were booked on the master, but fewer replicas than `wait_replicas` hold them yet: they
    are spooled and replayed (idempotent) until they are replicated. Redis itself is up."""


@dataclass(frozen=True, slots=True)
class LedgerPolicy:
    """Retention and sizes, from the settings."""

    stream_maxlen: int = 1_000_000
    ledger_days: int = 400
    idempotency_days: int = 3
    request_index_days: int = 30
    wait_replicas: int = 0  # WAIT for this many replicas after each CHARGE call
    wait_ms: int = 1000


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
    request_delta: int = 0  # requests a lease counted in the window and did not use (<= 0)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes) -> Charge:
        return cls(**orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class AdmitResult:
    code: int  # 0 ok, 1 unknown, 2 revoked, 3 requests/min, 4 tokens/min, 5 budget, 6 no lease (ahead of need)
    tenant: str = ""
    role: str = "user"
    flags: int = 0  # 1: the key has a budget, 2: a tokens/min limit, 4: a requests/min limit
    retry_after: int = 0
    period: str = ""
    granted: int = 1  # requests admitted (more than 1: a lease)
    held: bool = False  # budget refusals: the spend leaves room, reservations (in flight, leases) are in the way


class Ledger:
    def __init__(self, pipe: Pipe, policy: LedgerPolicy, book_pipe: Pipe | None = None) -> None:
        self.pipe = pipe
        # Where `apply` books charges: the request path's pipe, or with `wait_replicas` a pipe of its own, so
        # that admissions never queue behind a WAIT, which blocks its connection until replicas answer.
        self.book_pipe = book_pipe or pipe
        self.policy = policy
        # Admissions waiting for the connection's next write, by (key id, minute, reservation ttl).
        self._admissions: dict[tuple[str, int, int], list[_Admission]] = {}
        # Called with the connection just before each write, after the admissions: a chance to add charges.
        self.ride_along: Callable[[Link], None] | None = None
        pipe.before_flush = self._before_flush

    async def load_scripts(self) -> None:
        for reply in await self.pipe.execute([("SCRIPT", "LOAD", s.source) for s in (ADMIT, CHARGE)]):
            if isinstance(reply, Exception):
                raise reply

    async def admit(
        self,
        sha256: str,
        key_id: str,
        charge_id: str,
        worst_micros: int,
        worst_tokens: int,
        now_ms: int,
        reservation_ttl_ms: int,
        wanted: int = 1,
    ) -> AdmitResult:
        """Queue the admission for the connection's next write, where the admissions of one key and minute
        become one ADMIT call (`_before_flush`), and wait for its answer. `wanted` > 1 asks for a lease of
        up to that many requests (`charge_id` is then the lease's id); `-wanted`, a lease asked for ahead of
        need: granted whole (8 or more) or not at all (code 6)."""
        for attempt in (0, 1):
            conn = self.pipe.proto or await self.pipe.connection()
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            group = (key_id, now_ms // 60_000, reservation_ttl_ms)
            batch = self._admissions.get(group)
            if batch is None:
                self._admissions[group] = batch = []
            batch.append((sha256, charge_id, worst_micros, worst_tokens, now_ms, wanted, fut))
            conn.schedule()
            try:
                r = await fut
            except NoScriptError:  # Redis restarted (or flushed its script cache): load and run once more
                if attempt:
                    raise
                await self.load_scripts()
                continue
            code = int(r[0])
            if code == 0:
                return AdmitResult(0, r[1].decode(), r[2].decode() if r[2] else "user", int(r[3]), granted=int(r[4]))
            if code in (3, 4):
                return AdmitResult(code, retry_after=int(r[1]))
            if code == 5:
                return AdmitResult(5, retry_after=int(r[1]), period=r[2].decode(), held=r[3] == 1)
            return AdmitResult(code)
        raise AssertionError("unreachable")

    def _before_flush(self, conn: Link) -> None:
        """Called by the connection just before it writes: the admissions queued since the last write go in
        it, one ADMIT call per key and minute; then the charges waiting to be booked (`ride_along`)."""
        if self._admissions:
            groups, self._admissions = self._admissions, {}
            for (key_id, minute, ttl), items in groups.items():
                k = KeyKeys(key_id)
                day, month, day_end, month_end = calendar_of(items[0][4])
                args: list[Any] = [ttl, day_end, month_end, day, month]
                for it in items:
                    args += it[:6]
                cmd = ("EVALSHA", ADMIT.sha, 4, k.record, k.window(minute), k.window(minute - 1), k.reservations, *args)
                conn.send(cmd).add_done_callback(functools.partial(_deliver, items))
        if self.ride_along is not None and conn.failed is None:
            self.ride_along(conn)

    def _commands(self, charges: list[Charge]) -> tuple[list[Command], list[list[int]]]:
        """One CHARGE call per API key among `charges`, and for each call the positions of its charges."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(charges):
            groups.setdefault(c.key_id, []).append(i)
        p = self.policy
        cmds: list[Command] = []
        for key_id, idx in groups.items():
            k = KeyKeys(key_id)
            keys = _KeyList([k.record, k.reservations, k.stream])
            pos = keys.pos
            pack = CHARGE_FIELDS.pack
            args: list[Any] = [
                p.idempotency_days * _DAY,
                p.ledger_days * _DAY,
                p.stream_maxlen,
                p.request_index_days * _DAY,
            ]
            per_minute: dict[
                tuple[int, int], tuple[int, int, int, int, int, int]
            ] = {}  # what one minute's charges share
            for i in idx:
                c = charges[i]
                shared = per_minute.get((c.ts_ms // 60_000, c.minute))
                if shared is None:
                    day, month, _, _ = calendar_of(c.ts_ms)
                    shared = per_minute[(c.ts_ms // 60_000, c.minute)] = (
                        int(day),
                        int(month),
                        pos(k.done(day)),
                        pos(k.window(c.minute)),
                        pos(k.counters(day)),
                        pos(k.requests(day)),
                    )
                d, m, done, window, counters, requests = shared
                r = c.record
                if r is None:
                    args += (
                        pack(
                            c.cost_micros,
                            c.token_delta,
                            c.request_delta,
                            c.key_state,
                            c.reserved_micros,
                            d,
                            m,
                            done,
                            window,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                        )
                        + f"{c.id},,".encode(),
                        "",
                    )
                    continue
                wf = r.get("workflow")
                args += (
                    pack(
                        c.cost_micros,
                        c.token_delta,
                        c.request_delta,
                        c.key_state,
                        c.reserved_micros,
                        d,
                        m,
                        done,
                        window,
                        counters,
                        pos(k.workflow_records(wf)) if wf else 0,
                        requests,
                        r["prompt_tokens"],
                        r["completion_tokens"],
                        r["reference_cost_micros"],
                        r["estimated"],
                    )
                    + f"{c.id},{(r.get('request_id') or '').replace(',', '_')},{c.group}".encode(),
                    orjson.dumps(r),
                )
            cmds.append(("EVALSHA", CHARGE.sha, len(keys.names), *keys.names, *args))
        return cmds, list(groups.values())

    async def apply(self, charges: list[Charge]) -> list[int | Exception]:
        """Apply charges in one round trip. Per charge: 1 booked now, 0 booked before (a replay), or the
        error a script answered with. A lost connection or a timeout raises: which charges were applied
        is then unknown, and applying them again is safe."""
        return await self.send(charges, await self.book_pipe.connection())

    def send(self, charges: list[Charge], conn: Link) -> Coroutine[Any, Any, list[int | Exception]]:
        """Queue the charges' commands on `conn` now (they go out with its next write); the returned
        coroutine waits for the replies, as `apply`."""
        cmds, groups = self._commands(charges)
        return self._collect(cmds, groups, len(charges), self._issue(conn, cmds))

    def _issue(self, conn: Link, cmds: list[Command]) -> list[tuple[asyncio.Future[Any], asyncio.Future[Any] | None]]:
        """Each CHARGE call and (with `wait_replicas`) the WAIT that answers for it: one WAIT per node, after
        that node's last CHARGE, as WAIT counts the replicas holding every write the connection made so far
        (one WAIT a CHARGE would block the connection once per CHARGE when a replica is missing)."""
        charges = [conn.send(c) for c in cmds]
        n, ms = self.policy.wait_replicas, self.policy.wait_ms
        if not n:
            return [(f, None) for f in charges]
        nodes = [conn.node(c[3]) for c in cmds]
        last = {node: c[3] for node, c in zip(nodes, cmds, strict=True)}  # node -> key of its last CHARGE call
        waits = {node: conn.send(("WAIT", n, ms), key=key) for node, key in last.items()}
        return [(f, waits[node]) for f, node in zip(charges, nodes, strict=True)]

    async def _collect(
        self,
        cmds: list[Command],
        groups: list[list[int]],
        n: int,
        futs: list[tuple[asyncio.Future[Any], asyncio.Future[Any] | None]],
    ) -> list[int | Exception]:
        replies: list[Any] = []
        short: list[int] = []  # replicas that acknowledged, where fewer than asked
        for f, wait in futs:  # replies arrive together: one wake-up, then the rest are done already
            try:
                replies.append(await f)
                if wait is not None and (acked := int(await wait)) < self.policy.wait_replicas:
                    short.append(acked)
            except (ConnectionError, TimeoutError):
                for pair in futs:  # all failed with the connection: mark their errors as seen
                    for rest in pair:
                        if rest is not None and rest.done() and not rest.cancelled():
                            rest.exception()
                raise
            except ResponseError as exc:
                replies.append(exc)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.load_scripts()  # the scripts that ran were idempotent; run them all again
            return await self._collect(cmds, groups, n, self._issue(await self.book_pipe.connection(), cmds))
        if short:
            # Booked on the master but not yet on enough replicas: a failover now could lose them. Spooled
            # and replayed (idempotent), they count once whatever happens to this master.
            raise NotReplicated(f"NOREPLICAS {min(short)} of {self.policy.wait_replicas} replicas hold the charges")
        transient = next((r for r in replies if isinstance(r, ResponseError) and str(r).startswith(TRANSIENT)), None)
        if transient is not None:
            raise transient
        results: list[int | Exception] = [0] * n
        for idx, reply in zip(groups, replies, strict=True):
            for j, i in enumerate(idx):  # an error answers for every charge of its call
                results[i] = reply if isinstance(reply, Exception) else int(reply[j])
        return results
