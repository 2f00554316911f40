"""A scriptable OpenAI-compatible upstream on a real loopback port (stands in for vLLM and OpenAI).

Each test scripts the next responses: status, headers, latency before headers, streamed chunks with a
delay between them, a connection cut after N chunks. Requests received are recorded, and a stream whose
client went away is noticed (so tests can prove the gateway closed the upstream).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.threaded import ThreadedServer

__all__ = ["FakeUpstream", "Script"]


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # dict -> JSON; bytes as is; None -> a normal completion
    delay: float = 0.0  # before headers
    chunk_delay: float = 0.0  # between stream chunks
    n_chunks: int = 3
    cut_after: int | None = None  # stream: drop the connection after this many chunks
    first_chunk_delay: float = 0.0
    usage_in_stream: bool = True
    done: bool = True  # stream ends with [DONE]
    content: str = "hello"
    prompt_tokens: int = 5  # usage reported
    completion_tokens: int | None = None  # None: 3 (non-stream), n_chunks (stream)
    usage_in_body: bool = True  # non-stream: include `usage`


def completion(model: str, content: str, prompt_tokens: int = 5, completion_tokens: int = 3) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class FakeUpstream(ThreadedServer):
    def __init__(self, name: str = "fake", tls: ssl.SSLContext | None = None) -> None:
        super().__init__(name, tls)
        self.scripts: deque[Script] = deque()
        self.default = Script()
        self.disconnects = 0
        self.disconnected = threading.Event()
        self.health_status = 200

    @property
    def base_url(self) -> str:
        # https by name: the test CA's certificate is for localhost
        return f"https://localhost:{self.port}/v1" if self.tls else f"http://127.0.0.1:{self.port}/v1"

    def push(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    def reset(self) -> None:
        self.default = Script()
        self.scripts.clear()
        self.requests.clear()
        self.disconnects = 0
        self.disconnected.clear()
        self.health_status = 200

    # -- server --------------------------------------------------------------------------------------
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_get("/health", self._health)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status, text="ok")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"path": request.path, "body": body, "headers": dict(request.headers)})
        s = self.scripts.popleft() if self.scripts else self.default
        if s.delay:
            await asyncio.sleep(s.delay)
        model = body.get("model", "?")
        if s.status != 200 or s.body is not None:
            payload = s.body if s.body is not None else {"error": {"message": f"scripted {s.status}", "type": "x"}}
            raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            return web.Response(status=s.status, body=raw, headers={"Content-Type": "application/json", **s.headers})
        if not body.get("stream"):
            doc = completion(
                model, s.content, s.prompt_tokens, 3 if s.completion_tokens is None else s.completion_tokens
            )
            if not s.usage_in_body:
                del doc["usage"]
            return web.Response(body=orjson.dumps(doc), headers={"Content-Type": "application/json", **s.headers})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **s.headers})
        await resp.prepare(request)
        chunks = [chunk(model, {"role": "assistant", "content": ""})]
        chunks += [chunk(model, {"content": f"{s.content}{i} "}) for i in range(s.n_chunks)]
        chunks.append(chunk(model, {}, "stop"))
        if s.usage_in_stream and (body.get("stream_options") or {}).get("include_usage"):
            ct = s.n_chunks if s.completion_tokens is None else s.completion_tokens
            chunks.append(
                b"data: "
                + orjson.dumps(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": model,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": s.prompt_tokens,
                            "completion_tokens": ct,
                            "total_tokens": s.prompt_tokens + ct,
                        },
                    }
                )
                + b"\n\n"
            )
        if s.done:
            chunks.append(b"data: [DONE]\n\n")
        try:
            for i, c in enumerate(chunks):
                if s.cut_after is not None and i >= s.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if i == 0 and s.first_chunk_delay:
                    await asyncio.sleep(s.first_chunk_delay)
                elif i > 0 and s.chunk_delay:
                    await asyncio.sleep(s.chunk_delay)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError
                await resp.write(c)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            self.disconnect_time = time.monotonic()
            self.disconnected.set()
            raise
        return resp
