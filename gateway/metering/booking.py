"""Booking charges: the queue after `settle`, the ride-along with admissions' writes, the spool when Redis
is away, and its replay. Also the one view of Redis health that admission and booking share.

A charge is queued by `settle` (after the response) and sent either inside the next write the Redis
connection makes for an admission (`ride_along`, called by the connection just before it writes: one
syscall and one Redis wake-up for both) or, when no admission comes, on its own after BOOK_DELAY_SECONDS.
With QLP_REDIS_WAIT_REPLICAS, charges never ride along: each CHARGE is followed by a WAIT, which holds its
connection until the replicas answer, so they go on the ledger's own booking connections instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gateway.metering.ledger import Charge, Ledger, NotReplicated
from gateway.metering.pipe import Link
from gateway.metering.spool import Spool

__all__ = ["BOOK_DELAY_SECONDS", "UNAVAILABLE", "Booker", "Health"]

log = logging.getLogger("qlp.metering")

UNAVAILABLE = (RedisError, OSError, TimeoutError)
DOWN_RETRY_SECONDS = 1.0
BOOK_DELAY_SECONDS = 0.010


class Health:
    """Is Redis usable? After a failure it is left alone for DOWN_RETRY_SECONDS, so that requests do not
    each wait on a dead server; the replayer's ping (or that delay) brings it back."""

    def __init__(self, spool_path: Path, on_up: Callable[[], None]) -> None:
        self.up = False
        self._retry_at = 0.0
        self._spool_path = spool_path
        self._on_up = on_up

    def mark_up(self) -> None:
        if not self.up:
            if self._retry_at:
                log.warning("Redis is reachable again")
            self.up = True
            self._on_up()

    def mark_down(self, exc: BaseException) -> None:
        if self.up or not self._retry_at:
            log.error("Redis unreachable (%s): charges go to the spool %s", type(exc).__name__, self._spool_path)
        self.up = False
        self._retry_at = time.monotonic() + DOWN_RETRY_SECONDS

    def usable(self) -> bool:
        return self.up or time.monotonic() >= self._retry_at


class Booker:
    def __init__(self, ledger: Ledger, spool: Spool, health: Health) -> None:
        self.ledger = ledger
        self.spool = spool
        self.health = health
        self._queue: list[Charge] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Charges ride along with admissions unless they WAIT for replicas; then one booking (one WAIT) at a
        # time, and what is queued meanwhile goes in the next batch: a missing replica makes every WAIT run
        # to its timeout, and WAITs piling up on one connection would soon exceed QLP_REDIS_TIMEOUT.
        self._waits = ledger.book_pipe is not ledger.pipe
        self._one_at_a_time = asyncio.Lock()
        if not self._waits:
            ledger.ride_along = self.ride_along

    def queue(self, charge: Charge) -> None:
        self._queue.append(charge)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BOOK_DELAY_SECONDS, self._flush)

    def _take(self) -> list[Charge]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        return batch

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ride_along(self, conn: Link) -> None:
        """Called by the Redis connection just before it writes: queued charges go in that write."""
        if self._queue and self.health.up:
            batch = self._take()
            self._track(self._finish(batch, self.ledger.send(batch, conn)))

    def _flush(self) -> None:
        if self._waits and self._one_at_a_time.locked():  # a booking's WAIT is out: look again shortly
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(BOOK_DELAY_SECONDS, self._flush)
            return
        batch = self._take()
        if batch:
            self._track(self._book(batch))

    async def drain(self) -> None:
        """Book every queued charge now (at shutdown)."""
        while True:
            self._flush()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            elif self._queue:  # behind a replay's WAIT
                await asyncio.sleep(BOOK_DELAY_SECONDS)
            else:
                return

    def _turn(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Where bookings take turns: one at a time when they WAIT, side by side otherwise."""
        return self._one_at_a_time if self._waits else contextlib.nullcontext()

    async def _book(self, batch: list[Charge]) -> None:
        if not self.health.usable():
            await self._spool(batch)
            return
        async with self._turn():
            await self._finish(batch, self.ledger.apply(batch))

    async def _finish(self, batch: list[Charge], booking: Coroutine[Any, Any, list[int | Exception]]) -> None:
        try:
            results = await booking
        except NotReplicated:  # Redis is up; the charges wait in the spool until a replica holds them
            await self._spool(batch)
        except UNAVAILABLE as exc:
            self.health.mark_down(exc)
            await self._spool(batch)
        else:
            self.health.mark_up()
            self._reject_refused(batch, results)

    async def _spool(self, batch: list[Charge]) -> None:
        served = [c for c in batch if c.record is not None]  # unserved: the reservation expires by itself
        if not served:
            return
        try:
            await self.spool.append(served)
        except OSError as exc:
            for c in served:
                log.error(
                    "charge %s (request %s, %d micro-USD) could not be spooled: %s",
                    c.id,
                    (c.record or {}).get("request_id"),
                    c.cost_micros,
                    exc,
                )

    def _reject_refused(self, batch: list[Charge], results: list[int | Exception]) -> None:
        for c, r in zip(batch, results, strict=True):
            if isinstance(r, Exception):
                log.error("Redis refused charge %s: %s; kept in %s.rejected", c.id, r, self.spool.path.name)
                try:
                    self.spool.reject(c, str(r))
                except OSError as exc:
                    log.error("charge %s could not be kept: %s", c.id, exc)

    async def _replay_batch(self, batch: list[Charge]) -> None:
        async with self._turn():
            self._reject_refused(batch, await self.ledger.apply(batch))

    async def replay_once(self) -> int:
        """Ping Redis when it is down or the spool holds charges; replay the spool when it answers."""
        pending = await asyncio.to_thread(self.spool.has_pending)
        if self.health.up and not pending:
            return 0
        try:
            await self.ledger.pipe.call("PING")
        except UNAVAILABLE as exc:
            self.health.mark_down(exc)
            return 0
        self.health.mark_up()
        if not pending:
            return 0
        try:
            n = await self.spool.replay(self._replay_batch)
        except NotReplicated as exc:
            log.warning("spooled charges wait for a replica: %s", exc)
            return 0
        except UNAVAILABLE as exc:
            self.health.mark_down(exc)
            return 0
        if n:
            log.warning("replayed %d spooled charges into the ledger", n)
        return n

    async def replay_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.replay_once()
            except Exception:  # logged and retried: the spool stays on disk
                log.exception("spool replay failed")
