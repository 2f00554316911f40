"""The request path's Redis connection for a Redis Cluster: `RedisPipe`'s auto-pipelining, one connection per
master, every command sent to the master of its key's slot.

The metering keys of one API key share a hash tag (`qlp:{k:<id>}:...`, gateway/metering/layout.py), so every
ADMIT and CHARGE call is one slot and one master. The router looks like one `Connection` to the ledger: the
commands of one turn of the event loop are written together, one write per master. Keyless commands (PING,
SCRIPT LOAD) go to every master and succeed when all of them do.

Topology changes: a MOVED reply updates the slot's owner and re-sends there (a reshard, or a failover the
map has not seen yet); ASK re-sends once with ASKING. A lost master fails its pending commands with
ConnectionError, as `RedisPipe` does (charges are then spooled and replayed, admissions fail open for known
keys), and the slot map is read again from any node that answers, so that the promoted replica takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from gateway.metering.pipe import Command, Holder, Link, RedisPipe, WriteTurn, ask_each, open_connection
from gateway.metering.target import RedisTarget, parse_redis_url

__all__ = ["ClusterPipe", "open_pipe"]

log = logging.getLogger("qlp.metering")

SLOTS = 16384
KEYLESS = frozenset({b"PING", b"SCRIPT", b"WAIT"})
MAX_REDIRECTS = 3
Address = tuple[str, int]


def open_pipe(url: str, timeout: float) -> RedisPipe | ClusterPipe:
    """The request path's connection for `QLP_REDIS_URL`, whatever kind of Redis it names."""
    target = parse_redis_url(url)
    return ClusterPipe(target, timeout) if target.kind == "cluster" else RedisPipe(target, timeout)


def _name(args: Command) -> bytes:
    a = args[0]
    return (a if isinstance(a, bytes) else str(a).encode()).upper()


def _key(args: Command) -> bytes | None:
    """The key that decides a command's slot: EVAL/EVALSHA's first key, else the first argument."""
    name = _name(args)
    if name in KEYLESS:
        return None
    if name in (b"EVAL", b"EVALSHA", b"FCALL"):
        if int(args[2]) == 0:
            return None
        k = args[3]
    else:
        k = args[1]
    return k if isinstance(k, bytes) else str(k).encode()


class Router(WriteTurn):
    """The ledger's `Connection` for a cluster: same `send`, `schedule` and `failed`."""

    def __init__(self, pipe: ClusterPipe) -> None:
        self.pipe = pipe
        self.flush_scheduled = False
        self.failed: Exception | None = None  # never set: a lost master fails only its own commands

    def send(self, args: Command, key: Any = None) -> asyncio.Future[Any]:
        outer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._dispatch(args, outer, 0, None, key)
        self.schedule()
        return outer

    def node(self, key: Any) -> Any:
        return self.pipe.owner(key_slot(key if isinstance(key, bytes) else str(key).encode()))

    def flush(self) -> None:
        self.run_hook(self.pipe.before_flush)  # admissions and charges join this write
        for node in self.pipe.nodes.values():
            if node.proto is not None and node.proto.out:
                node.proto.flush()

    def _dispatch(
        self, args: Command, outer: asyncio.Future[Any], redirects: int, ask: Address | None, key: Any = None
    ) -> None:
        key = _key(args) if key is None else key if isinstance(key, bytes) else str(key).encode()
        if key is None:
            self._broadcast(args, outer)
            return
        address = ask or self.pipe.owner(key_slot(key))
        node = self.pipe.nodes.get(address) if address else None
        if node is None or node.proto is None:
            self.pipe.refresh_soon()
            outer.set_exception(ConnectionError(f"no connection to the master of slot {key_slot(key)}"))
            return
        if ask is not None:
            node.proto.send(("ASKING",)).add_done_callback(_consume)
        node.proto.send(args).add_done_callback(functools.partial(self._answered, args, outer, redirects, key))

    def _broadcast(self, args: Command, outer: asyncio.Future[Any]) -> None:
        masters = self.pipe.masters()
        if not masters or any(n.proto is None for n in masters):
            self.pipe.refresh_soon()
            outer.set_exception(ConnectionError("not every master of the cluster is connected"))
            return
        futs = [n.proto.send(args) for n in masters if n.proto is not None]
        gathered = asyncio.gather(*futs, return_exceptions=True)

        def done(g: asyncio.Future[list[Any]]) -> None:
            if outer.done():
                return
            replies = g.result()
            exc = next((r for r in replies if isinstance(r, BaseException)), None)
            if exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(replies[0])

        gathered.add_done_callback(done)

    def _answered(
        self, args: Command, outer: asyncio.Future[Any], redirects: int, key: bytes, inner: asyncio.Future[Any]
    ) -> None:
        if inner.cancelled():
            if not outer.done():
                outer.cancel()
            return
        exc = inner.exception()
        if outer.done():
            return
        if isinstance(exc, ResponseError) and redirects < MAX_REDIRECTS:
            kind, _, rest = str(exc).partition(" ")
            if kind in ("MOVED", "ASK"):
                slot, _, where = rest.partition(" ")
                host, _, port = where.rpartition(":")
                address = (host or self.pipe.last_host, int(port))
                self.pipe.track(self.pipe.redirect(kind, int(slot), address, args, outer, redirects + 1, key))
                return
        if isinstance(exc, ConnectionError | TimeoutError):
            self.pipe.refresh_soon()
        if exc is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(inner.result())


def _consume(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()


class ClusterPipe:
    """`RedisPipe`'s interface (`proto`, `connection`, `execute`, `call`, `close`, `before_flush`) over a
    Redis Cluster."""

    def __init__(self, url: str | RedisTarget, timeout: float) -> None:
        self.target = url if isinstance(url, RedisTarget) else parse_redis_url(url)
        if self.target.kind != "cluster":
            raise ValueError("ClusterPipe needs a redis+cluster:// URL")
        self.timeout = timeout
        self.before_flush: Callable[[Link], None] | None = None
        self.nodes: dict[Address, Holder] = {}  # the masters' connections
        self._slots: list[Address | None] = [None] * SLOTS
        self._owners: frozenset[Address] = frozenset()  # the addresses in _slots (read on every request)
        self._router = Router(self)
        self._refreshing: asyncio.Lock | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_host = self.target.nodes[0][0]

    # -- the pipe's interface -----------------------------------------------------------------------------

    @property
    def proto(self) -> Link | None:
        """The router while every master is connected; None sends callers to `connection()`."""
        masters = self.masters()
        if masters and all(n.proto is not None for n in masters):
            return self._router
        return None

    async def connection(self) -> Link:
        if self.proto is None:
            await self.refresh()
        router = self.proto
        if router is None:
            raise ConnectionError(f"not every master of {self.target.describe()} is reachable")
        return router

    async def execute(self, commands: list[Command]) -> list[Any]:
        router = await self.connection()
        done = await asyncio.gather(*(router.send(c) for c in commands), return_exceptions=True)
        for r in done:
            if isinstance(r, ConnectionError | TimeoutError):
                raise r
        return list(done)

    async def call(self, *args: Any) -> Any:
        return await (await self.connection()).send(args)

    def close(self) -> None:
        for task in (self._refresh_task, *self._tasks):
            if task is not None:
                task.cancel()
        for node in self.nodes.values():
            if node.proto is not None:
                node.proto.fail(ConnectionError("closed"))
        self.nodes.clear()

    # -- the slot map -------------------------------------------------------------------------------------

    def owner(self, slot: int) -> Address | None:
        return self._slots[slot]

    def masters(self) -> list[Holder]:
        return [n for a, n in self.nodes.items() if a in self._owners]

    def _move(self, slot: int, address: Address) -> None:
        """A MOVED reply: `slot` is `address`'s now (rare: a reshard, or a failover not yet in the map)."""
        self._slots[slot] = address
        self._owners = frozenset(a for a in self._slots if a is not None)

    def track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refresh_soon(self) -> None:
        """Read the slot map again in the background (once at a time)."""
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self.refresh()

    async def refresh(self) -> None:
        """Ask the known masters, then the seeds, for the slot map; connect to every master in it."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            slots = await self._read_slots()
            table: list[Address | None] = [None] * SLOTS
            for entry in slots:
                lo, hi, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() if master[0] else self.last_host
                address = (host, int(master[1]))
                for s in range(lo, hi + 1):
                    table[s] = address
            wanted = {a for a in table if a is not None}
            for old in list(self.nodes):
                if old not in wanted:  # no longer a master (failed, or demoted to replica)
                    node = self.nodes.pop(old)
                    if node.proto is not None:
                        node.proto.fail(ConnectionError("no longer a master"))
            self._slots = table
            self._owners = frozenset(wanted)
            errors = []
            for master in wanted:
                try:
                    await self._node(master)
                except ConnectionError as exc:
                    errors.append(str(exc))
            if errors:
                raise ConnectionError("; ".join(errors))

    async def _read_slots(self) -> list[Any]:
        candidates = [*self.nodes, *(a for a in self.target.nodes if a not in self.nodes)]
        address, reply = await ask_each(
            self.target, candidates, self.timeout, ("CLUSTER", "SLOTS"),
            lambda r: None if r and sum(int(e[1]) - int(e[0]) + 1 for e in r) == SLOTS
            else "the slot map does not cover every slot yet",
            f"no node of {self.target.describe()} gave a slot map",
        )  # fmt: skip
        self.last_host = address[0]
        slots: list[Any] = reply
        return slots

    async def _node(self, address: Address) -> Holder:
        node = self.nodes.get(address)
        if node is not None and node.proto is not None:
            return node
        holder = node or Holder(self.timeout)
        holder.proto = await open_connection(holder, self.target, address)
        self.nodes[address] = holder
        return holder

    async def redirect(
        self,
        kind: str,
        slot: int,
        address: Address,
        args: Command,
        outer: asyncio.Future[Any],
        redirects: int,
        key: bytes,
    ) -> None:
        try:
            await self._node(address)
        except ConnectionError as exc:
            if not outer.done():
                outer.set_exception(exc)
            return
        if kind == "MOVED":
            self._move(slot, address)
            self.refresh_soon()  # one moved slot is usually many: read the whole map
        if not outer.done():
            self._router._dispatch(args, outer, redirects, address if kind == "ASK" else None, key)
            self._router.schedule()
