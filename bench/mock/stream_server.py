"""A mock streaming upstream: SSE chunks at a fixed rate, usage chunk, [DONE]. Run: python -m bench.mock.stream_server PORT"""

from __future__ import annotations

import asyncio
import sys

import orjson
import uvloop
from aiohttp import web

CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}],
        }
    )
    + b"\n\n"
)
USAGE = (
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "bench",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
        }
    )
    + b"\n\n"
)
BODY = orjson.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
    }
)


def make_app(n_chunks: int, interval: float, latency: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if latency:
            await asyncio.sleep(latency)
        if not body.get("stream"):
            return web.Response(body=BODY, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n_chunks):
            await resp.write(CHUNK)
            await asyncio.sleep(interval)
        await resp.write(USAGE + b"data: [DONE]\n\n")
        return resp

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
    latency = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    web.run_app(make_app(n, interval, latency), host="127.0.0.1", port=port, print=None, loop=uvloop.new_event_loop())
