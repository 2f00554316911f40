"""A fault-injecting TCP proxy on loopback, to put between the gateway and an upstream.

    proxy = FaultProxy(upstream_port).start()     # its own thread and event loop, like FakeUpstream
    base_url = proxy.base_url                     # http://127.0.0.1:<proxy port>/v1
    proxy.set("latency", latency=0.2)             # switch faults at run time
    proxy.connections                             # connections accepted so far (upstream attempts)

Modes (a connection keeps the mode it was accepted under; `set` closes live connections by default, so
a kept-alive connection in the gateway's pool cannot carry an old mode into the next request):

    pass       forward both ways
    latency    delay every chunk, each direction, by `latency` seconds
    reset      read the request, then answer with a TCP RST (SO_LINGER 0): an upstream that crashed
    cut        forward the response's first `after` bytes, then close (RST when `rst`, else FIN)
    stall      forward the response's first `after` bytes, then forward nothing more and keep the
               connection open: an upstream that hangs mid-stream
    blackhole  accept, read and discard, never connect upstream and never answer

Traffic goes only to the configured target on loopback. Used by tests/reliability and bench/soak.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from tests.fakes.threaded import LoopThread

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "latency", "reset", "cut", "stall", "blackhole"]
_BUF = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Fault:
    mode: Mode = "pass"
    latency: float = 0.0
    after: int = 0
    rst: bool = False


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy(LoopThread):
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy forwards to loopback only")
        super().__init__("fault-proxy")
        self.target = (target_host, target_port)
        self.connections = 0  # accepted, whatever the mode
        self.bytes_up = 0  # client -> upstream, forwarded
        self.bytes_down = 0  # upstream -> client, forwarded
        self._fault = _Fault()
        self._live: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- control (thread-safe) -------------------------------------------------------------------------
    def set(
        self, mode: Mode, *, latency: float = 0.0, after: int = 0, rst: bool = False, close_existing: bool = True
    ) -> None:
        self._fault = _Fault(mode, latency, after, rst)
        if close_existing:
            self.close_connections()

    def close_connections(self) -> None:
        """Close every live connection (both sides) and wait until it is done."""
        if self._loop is None:
            return

        async def close_all() -> None:
            for w in list(self._live):
                w.transport.abort()
            self._live.clear()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)

    @property
    def live(self) -> int:
        """Connections open now (client side and upstream side each count)."""
        return len(self._live)

    def reset_counters(self) -> None:
        self.connections = self.bytes_up = self.bytes_down = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._live):
            w.transport.abort()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- the proxy ------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        fault = self._fault
        self._live.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if fault.mode == "blackhole":
                while await reader.read(_BUF):
                    pass
                return
            if fault.mode == "reset":
                await reader.read(_BUF)
                _abort_with_rst(writer)
                return
            up_reader, upstream = await asyncio.open_connection(*self.target)
            self._live.add(upstream)
            pumps = {
                asyncio.create_task(self._pump(reader, upstream, fault, down=False)),
                asyncio.create_task(self._pump(up_reader, writer, fault, down=True)),
            }
            # Either side finishing ends the connection: the client went away (a stalled response
            # pump would otherwise wait forever), or the upstream closed or was cut.
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        except OSError:
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._live.discard(w)
                    w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, fault: _Fault, *, down: bool) -> None:
        sent = 0
        try:
            while data := await src.read(_BUF):
                if fault.latency:
                    await asyncio.sleep(fault.latency)
                if down and fault.mode in ("cut", "stall") and len(data) >= fault.after - sent:
                    room = max(0, fault.after - sent)
                    dst.write(data[:room])
                    await dst.drain()
                    self.bytes_down += room
                    if fault.mode == "cut":
                        if fault.rst:
                            _abort_with_rst(dst)
                        else:
                            dst.close()
                        return
                    await asyncio.Event().wait()  # stall: hold the connection until the client leaves
                dst.write(data)
                await dst.drain()
                sent += len(data)
                if down:
                    self.bytes_down += len(data)
                else:
                    self.bytes_up += len(data)
        except OSError:
            pass
