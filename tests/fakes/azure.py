"""A loopback server that speaks Azure OpenAI's data-plane API, from its public reference.

    POST /openai/deployments/{deployment}/chat/completions?api-version=...   (and /completions)
    api-key: <key>

Wrong or missing `api-key` -> 401; missing or unknown `api-version` -> 404 "Resource not found"; unknown
deployment -> 404 DeploymentNotFound (Azure's error bodies). Answers are OpenAI's shapes with Azure's
additions (`prompt_filter_results`, and a first stream chunk with `choices: []`). Scripts (the same
`Script` as tests/fakes/upstream.py) give error statuses with headers such as `retry-after-ms`, and cuts.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.threaded import ThreadedServer
from tests.fakes.upstream import Script, chunk, completion

__all__ = ["API_VERSIONS", "FakeAzure"]

API_VERSIONS = frozenset({"2024-06-01", "2024-10-21", "2025-01-01-preview"})
_FILTER = [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": {"code": code, "message": message}}),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


class FakeAzure(ThreadedServer):
    def __init__(
        self, name: str = "azure", api_key: str = "azure-test-key-0123", deployments: tuple[str, ...] = ("gpt4o-prod",)
    ) -> None:
        super().__init__(name)
        self.api_key = api_key
        self.deployments = deployments
        self.scripts: deque[Script] = deque()
        self.default = Script()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    def reset(self) -> None:
        self.scripts.clear()
        self.default = Script()
        self.requests.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._handle)
        app.router.add_post("/openai/deployments/{deployment}/completions", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if request.query.get("api-version") not in API_VERSIONS:
            return _error(404, "404", "Resource not found")
        if request.headers.get("api-key") != self.api_key:
            return _error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. "
                "Make sure to provide a valid key for an active subscription.",
            )
        deployment = request.match_info["deployment"]
        if deployment not in self.deployments:
            return _error(404, "DeploymentNotFound", "The API deployment for this resource does not exist.")
        s = self.scripts.popleft() if self.scripts else self.default
        if s.status != 200 or s.body is not None:
            payload = (
                s.body if s.body is not None else {"error": {"code": str(s.status), "message": f"scripted {s.status}"}}
            )
            return web.Response(
                status=s.status,
                body=payload if isinstance(payload, bytes) else orjson.dumps(payload),
                headers={"Content-Type": "application/json", **s.headers},
            )
        model = "gpt-4o-2024-08-06"  # Azure answers with the deployed model, whatever the body said
        if not body.get("stream"):
            out: dict[str, Any] = {**completion(model, s.content), "prompt_filter_results": _FILTER}
            return web.Response(body=orjson.dumps(out), headers={"Content-Type": "application/json"})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [
            b"data: "
            + orjson.dumps(
                {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": _FILTER}
            )
            + b"\n\n",
            chunk(model, {"role": "assistant", "content": ""}),
        ]
        events += [chunk(model, {"content": f"{s.content}{i} "}) for i in range(s.n_chunks)]
        events.append(chunk(model, {}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(
                b"data: "
                + orjson.dumps(
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": s.n_chunks, "total_tokens": 5 + s.n_chunks},
                    }
                )
                + b"\n\n"
            )
        events.append(b"data: [DONE]\n\n")
        for i, ev in enumerate(events):
            if s.cut_after is not None and i >= s.cut_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(ev)
        await resp.write_eof()
        return resp
