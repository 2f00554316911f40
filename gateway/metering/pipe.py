"""An auto-pipelining Redis connection for the request path.

Every command issued by any request in the same event-loop turn goes out in one write, and replies are
matched back in order: under load, many requests share one round trip and one syscall each way. Commands
are packed and replies parsed by hiredis (C). redis-py's asyncio client packs in Python and takes a pooled
connection per call; on the request path that cost the gateway most of its throughput (measured with
bench/bench_metering.py, see docs/metering.md). Only the request path (admission, charges, spool replay,
pings) uses this connection; key admin and ledger reading use redis-py.

Failures surface as redis-py's exceptions so callers handle one family: a lost connection fails every
pending command with ConnectionError (the next call reconnects); a command not answered within `timeout`
drops the connection (later replies could no longer be matched) and fails with TimeoutError; an error reply
is a ResponseError (NoScriptError for NOSCRIPT). One timer per connection watches the oldest pending
command, instead of a timeout per call.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

__all__ = ["Command", "Connection", "RedisPipe"]

log = logging.getLogger("qlp.metering")
Command = tuple[Any, ...]


class Connection(asyncio.Protocol):
    def __init__(self, pipe: RedisPipe) -> None:
        self.pipe = pipe
        self.timeout = pipe.timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (reply, deadline), in send order
        self.out: list[bytes] = []  # packed commands of this turn of the loop, written together
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.failed: Exception | None = None

    def send(self, args: Command) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self.failed is not None:
            fut.set_exception(self.failed)
            return fut
        self.waiting.append((fut, time.monotonic() + self.timeout))
        self.out.append(hiredis.pack_command(args))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        if self.watchdog is None:
            self.watchdog = loop.call_later(self.timeout, self.watch)
        return fut

    def schedule(self) -> None:
        """Make sure a write happens at the end of this turn of the loop (for commands the `before_flush`
        hook adds then)."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        hook = self.pipe.before_flush
        if hook is not None:
            try:
                hook(self)  # may add commands to this write (admissions, charges waiting to be booked)
            except Exception:
                log.exception("before_flush hook failed")
        self.flush_scheduled = False
        out, self.out = self.out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def watch(self) -> None:
        self.watchdog = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        now = time.monotonic()
        if deadline <= now:
            self.fail(TimeoutError(f"Redis did not answer within {self.timeout}s"))
        else:
            self.watchdog = asyncio.get_running_loop().call_later(deadline - now, self.watch)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(ConnectionError("unexpected reply from Redis"))
                return
            fut = self.waiting.popleft()[0]
            if fut.done():
                continue  # its caller was cancelled
            if isinstance(reply, hiredis.ReplyError):
                msg = str(reply)
                fut.set_exception(NoScriptError(msg) if msg.startswith("NOSCRIPT") else ResponseError(msg))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        self.failed = self.failed or exc
        if self.pipe.proto is self:
            self.pipe.proto = None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiting:
            fut = self.waiting.popleft()[0]
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RedisPipe:
    def __init__(self, url: str, timeout: float) -> None:
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported Redis URL scheme {u.scheme!r} (redis://, rediss:// or unix://)")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        # unix:///run/redis.sock?db=0: a Redis on the same host, without the TCP stack in between
        self.unix_path = u.path if u.scheme == "unix" else None
        query = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p)
        self.db = int(query.get("db", "0") if self.unix_path else (u.path.lstrip("/") or 0))
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password else None
        self.ssl = ssl.create_default_context() if u.scheme == "rediss" else None
        self.timeout = timeout
        self.proto: Connection | None = None
        self._connecting: asyncio.Lock | None = None
        # Called with the connection just before each write: a chance to add commands to it.
        self.before_flush: Callable[[Connection], None] | None = None

    async def connection(self) -> Connection:
        return self.proto or await self._connect()

    async def _connect(self) -> Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.proto is not None:
                return self.proto
            loop = asyncio.get_running_loop()
            proto: Connection | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    if self.unix_path is not None:
                        _, proto = await loop.create_unix_connection(lambda: Connection(self), self.unix_path)
                    else:
                        _, proto = await loop.create_connection(
                            lambda: Connection(self), self.host, self.port, ssl=self.ssl
                        )
                    hello: list[Command] = []
                    if self.password is not None:
                        hello.append(
                            ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                        )
                    if self.db:
                        hello.append(("SELECT", self.db))
                    for cmd in hello:
                        await proto.send(cmd)
            except (OSError, builtins.TimeoutError, TimeoutError, ResponseError) as exc:
                if proto is not None:
                    proto.fail(ConnectionError("handshake failed"))
                raise ConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from exc
            self.proto = proto
            return proto

    async def execute(self, commands: list[Command]) -> list[Any]:
        """Send commands together and return their replies in order. An error reply is returned as the
        exception, not raised; a lost connection or a timeout raises."""
        proto = self.proto or await self._connect()
        if len(commands) == 1:
            try:
                return [await proto.send(commands[0])]
            except ResponseError as exc:
                return [exc]
        done = await asyncio.gather(*(proto.send(c) for c in commands), return_exceptions=True)
        for r in done:
            if isinstance(r, ConnectionError | TimeoutError):
                raise r
        return list(done)

    async def call(self, *args: Any) -> Any:
        proto = self.proto or await self._connect()
        return await proto.send(args)

    def close(self) -> None:
        if self.proto is not None:
            self.proto.fail(ConnectionError("closed"))
