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
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import hiredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

from gateway.metering.target import RedisTarget, parse_redis_url

__all__ = ["Command", "Connection", "Holder", "Link", "Pipe", "RedisPipe", "ask_each", "open_connection"]

log = logging.getLogger("qlp.metering")
Command = tuple[Any, ...]


class Link(Protocol):
    """What the ledger writes to: one `Connection`, or a cluster's router in front of several."""

    failed: Exception | None

    def send(self, args: Command, key: Any = None) -> asyncio.Future[Any]:
        """Queue `args` for the next write. `key` routes a keyless command (WAIT) to that key's node."""
        ...

    def node(self, key: Any) -> Any:
        """Which server `key`'s commands go to (equal values: the same server)."""
        ...

    def schedule(self) -> None: ...


class Pipe(Protocol):
    """The request path's Redis: `RedisPipe` (one server, Sentinel) or `cluster.ClusterPipe`."""

    before_flush: Callable[[Link], None] | None

    @property
    def proto(self) -> Link | None: ...

    async def connection(self) -> Link: ...

    async def execute(self, commands: list[Command]) -> list[Any]: ...

    async def call(self, *args: Any) -> Any: ...

    def close(self) -> None: ...


class Owner(Protocol):
    """What a connection reports to: the pipe (or cluster node) whose `proto` it is."""

    timeout: float
    proto: Connection | None
    before_flush: Callable[[Link], None] | None


class Holder:
    """The owner of a connection nothing else owns (a node of a cluster, a Sentinel asked once)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.proto: Connection | None = None
        self.before_flush: Callable[[Link], None] | None = None


class WriteTurn:
    """One write per turn of the event loop, with the owner's `before_flush` hook run just before it
    (shared by `Connection` and the cluster's router)."""

    flush_scheduled: bool

    def schedule(self) -> None:
        """Make sure a write happens at the end of this turn of the loop (for commands the `before_flush`
        hook adds then)."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        raise NotImplementedError

    def run_hook(self, hook: Callable[[Link], None] | None) -> None:
        if hook is not None:
            try:
                hook(cast(Link, self))  # may add commands to this write (admissions, charges waiting to be booked)
            except Exception:
                log.exception("before_flush hook failed")
        self.flush_scheduled = False


class Connection(WriteTurn, asyncio.Protocol):
    def __init__(self, pipe: Owner) -> None:
        self.pipe = pipe
        self.timeout = pipe.timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (reply, deadline), in send order
        self.out: list[bytes] = []  # packed commands of this turn of the loop, written together
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.failed: Exception | None = None

    def send(self, args: Command, key: Any = None) -> asyncio.Future[Any]:
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

    def node(self, key: Any) -> Any:
        return None  # one server

    def flush(self) -> None:
        self.run_hook(self.pipe.before_flush)
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


async def open_connection(owner: Owner, target: RedisTarget, address: tuple[str, int] | None) -> Connection:
    """A connection to `address` (or the target's Unix socket), authenticated and on the target's database,
    within `owner.timeout`. `owner` is what the connection reports to."""
    timeout = owner.timeout
    loop = asyncio.get_running_loop()
    proto: Connection | None = None
    where = target.unix_path or (f"{address[0]}:{address[1]}" if address else "?")
    try:
        async with asyncio.timeout(timeout):
            if target.unix_path is not None:
                _, proto = await loop.create_unix_connection(lambda: Connection(owner), target.unix_path)
            else:
                assert address is not None
                _, proto = await loop.create_connection(
                    lambda: Connection(owner), address[0], address[1], ssl=target.ssl_context()
                )
            hello: list[Command] = []
            if target.password is not None:
                user = target.username
                hello.append(("AUTH", user, target.password) if user else ("AUTH", target.password))
            if target.db:
                hello.append(("SELECT", target.db))
            for cmd in hello:
                await proto.send(cmd)
    except (OSError, builtins.TimeoutError, TimeoutError, ResponseError) as exc:
        if proto is not None:
            proto.fail(ConnectionError("handshake failed"))
        raise ConnectionError(f"cannot connect to Redis at {where}: {exc}") from exc
    return proto


async def ask_each(
    target: RedisTarget,
    addresses: Iterable[tuple[str, int]],
    within: float,
    command: Command,
    refuse: Callable[[Any], str | None],
    failure: str,
) -> tuple[tuple[str, int], Any]:
    """`command` asked of each address in turn, on a connection of its own, until one answers with a reply
    `refuse` has no objection to (it returns the objection, or None); each within `within` seconds. None
    answering: ConnectionError naming `failure` and every address's reason."""
    errors = []
    for address in addresses:
        try:
            conn = await open_connection(Holder(within), target, address)
            try:
                reply = await conn.send(command)
            finally:
                conn.fail(ConnectionError("closed"))
        except (ConnectionError, TimeoutError, ResponseError) as exc:
            errors.append(f"{address[0]}:{address[1]}: {exc}")
            continue
        objection = refuse(reply)
        if objection is None:
            return address, reply
        errors.append(f"{address[0]}:{address[1]}: {objection}")
    raise ConnectionError(f"{failure}: {'; '.join(errors)}")


class RedisPipe:
    """One server (`redis://`, `unix://`), or the master a Sentinel names (`redis+sentinel://`, asked again
    on every reconnect, so a failover is followed). A Redis Cluster is `ClusterPipe` (`open_pipe` picks)."""

    def __init__(self, url: str | RedisTarget, timeout: float) -> None:
        self.target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
        if self.target.kind == "cluster":
            raise ValueError("a Redis Cluster URL needs ClusterPipe (gateway.metering.pipe.open_pipe)")
        self.timeout = timeout
        self.proto: Connection | None = None
        self._connecting: asyncio.Lock | None = None
        # Called with the connection just before each write: a chance to add commands to it.
        self.before_flush: Callable[[Link], None] | None = None

    async def connection(self) -> Connection:
        return self.proto or await self._connect()

    async def _connect(self) -> Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.proto is not None:
                return self.proto
            t = self.target
            address = await self._master() if t.kind == "sentinel" else (t.nodes[0] if t.nodes else None)
            self.proto = await open_connection(self, t, address)
            return self.proto

    async def _master(self) -> tuple[str, int]:
        """The address the first Sentinel that answers gives for the service."""
        t = self.target
        assert t.service is not None
        sentinel = RedisTarget("single", (), t.tls, password=t.sentinel_password)
        _, reply = await ask_each(
            sentinel, t.nodes, self.timeout, ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", t.service),
            lambda r: None if r else f"does not know {t.service!r}", f"no Sentinel named the master of {t.service!r}",
        )  # fmt: skip
        return reply[0].decode(), int(reply[1])

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
