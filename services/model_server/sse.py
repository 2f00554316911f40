"""HTTP plumbing shared by the routes: an SSE response that notices disconnects, and a disconnect watch.

Starlette's StreamingResponse only notices a gone client when a write fails (ASGI spec >= 2.4), which can
be long after the fact while a request waits in the queue. Here a listener on `receive` runs beside the
stream from the start; when the client goes, the stream is cancelled and `on_close` aborts generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["ClientGone", "SSEResponse", "run_unless_disconnected", "sse_event", "wait_for_disconnect"]

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


def sse_event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


async def wait_for_disconnect(receive: Receive) -> None:
    # The body has been read already, so the next message the server gives us is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (its cleanup runs) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            # Let the cancelled work run its cleanup (it aborts generation) before we go on.
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone
    return task.result()


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await send(
                            {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                        )
                        async for chunk in self.chunks:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    finally:
                        tg.cancel_scope.cancel()

                async def watch() -> None:
                    await wait_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        except OSError:
            pass  # the client went away mid-write
        finally:
            self.on_close()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
