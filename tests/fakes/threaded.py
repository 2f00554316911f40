"""Servers that tests reach over real loopback sockets, each on an event loop in a daemon thread of its own.

`LoopThread` runs the loop: `start()` opens the server on it (`_open`, which sets `port`) and returns once
it listens; `stop()` stops the loop, then `_close` runs on it. `ThreadedServer` is an aiohttp application
on such a loop (the fake upstreams and providers); the fault proxy is a plain asyncio server on one.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any, Self

import orjson
from aiohttp import web

__all__ = ["LoopThread", "ThreadedServer"]


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        """After the loop stopped: close what `_open` opened."""

    def start(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._open())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"fake-{self.name}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


class ThreadedServer(LoopThread):
    """An aiohttp application on 127.0.0.1 (subclasses add its `routes`). Records requests."""

    def __init__(self, name: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(name)
        self.requests: list[dict[str, Any]] = []
        self.tls = tls  # serve https with this server context
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _open(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def record(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "body": body,
                "headers": dict(request.headers),
                "raw": raw,
            }
        )
        return body if isinstance(body, dict) else {}
