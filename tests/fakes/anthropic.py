"""A loopback server that speaks Anthropic's Messages API (POST /v1/messages), from its public reference.

It checks what the real API checks and a translator could get wrong: the `x-api-key` and
`anthropic-version` headers, `max_tokens`, strict user/assistant alternation, no `system` role inside
`messages`, no unknown top-level fields, temperature within 0..1, tool results that answer a tool use.
Violations get Anthropic's error envelope (`{"type": "error", "error": {"type", "message"}}`).

Each test scripts the next answers: an error status (429 with or without retry-after, 529, 400, 401, a
spend-limit 429), text and tool-use content, usage with cache reads and writes, and for streams: bytes
split into small writes, a connection cut after N events, an `error` event after N events.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.threaded import ThreadedServer

__all__ = ["AnthropicScript", "FakeAnthropic", "anthropic_events", "anthropic_message"]

_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "stream",
    }
)


@dataclass
class AnthropicScript:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str | None = None  # with status != 200: Anthropic's error type
    error_details: dict[str, Any] | None = None  # e.g. {"error_code": "enforced_spend_limit_reached"}
    message: str = "scripted error"
    text: str = "Hello there, friend."
    tool: tuple[str, dict[str, Any]] | None = None  # a tool_use block after the text
    stop_reason: str | None = None  # default: tool_use with a tool, else end_turn
    input_tokens: int = 11
    output_tokens: int = 7
    cache_read: int = 0
    cache_write: int = 0
    split: int | None = None  # stream: write the bytes in pieces of this size
    cut_after: int | None = None  # stream: drop the connection after this many events
    error_event_after: int | None = None  # stream: send an `error` event after this many events, then end
    error_event_type: str = "overloaded_error"


def anthropic_message(s: AnthropicScript, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": s.text}] if s.text else []
    if s.tool:
        content.append({"type": "tool_use", "id": "toolu_01", "name": s.tool[0], "input": s.tool[1]})
    return {
        "id": "msg_fake01",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": s.stop_reason or ("tool_use" if s.tool else "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens,
            "cache_creation_input_tokens": s.cache_write,
            "cache_read_input_tokens": s.cache_read,
        },
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def anthropic_events(s: AnthropicScript, model: str) -> list[bytes]:
    """The stream of the same message `anthropic_message` returns, event by event."""
    msg = anthropic_message(s, model)
    start = {**msg, "content": [], "stop_reason": None, "usage": {**msg["usage"], "output_tokens": 1}}
    events = [_sse({"type": "message_start", "message": start}), _sse({"type": "ping"})]
    for i, block in enumerate(msg["content"]):
        if block["type"] == "text":
            events.append(
                _sse({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
            )
            words = block["text"].split(" ")
            for j, w in enumerate(words):
                piece = w if j == len(words) - 1 else w + " "
                events.append(
                    _sse({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": piece}})
                )
        else:
            events.append(_sse({"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}}))
            js = orjson.dumps(block["input"]).decode()
            third = max(1, len(js) // 3)
            for piece in (js[:third], js[third : 2 * third], js[2 * third :]):
                events.append(
                    _sse(
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        }
                    )
                )
        events.append(_sse({"type": "content_block_stop", "index": i}))
    events.append(
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": s.output_tokens},
            }
        )
    )
    events.append(_sse({"type": "message_stop"}))
    return events


def _error(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None, details: dict[str, Any] | None = None
) -> web.Response:
    err: dict[str, Any] = {"type": type_, "message": message}
    if details:
        err["details"] = details
    return web.Response(
        status=status,
        body=orjson.dumps({"type": "error", "error": err, "request_id": "req_fake"}),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _invalid(body: dict[str, Any]) -> str | None:
    """What the real API would refuse in this request body, or None."""
    extra = sorted(set(body) - _FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        return "max_tokens: Field required"
    t = body.get("temperature")
    if t is not None and not 0 <= t <= 1:
        return "temperature: Input should be less than or equal to 1"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: at least one message is required"
    tool_ids: set[str] = set()
    for i, m in enumerate(msgs):
        if m.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if i and m["role"] == msgs[i - 1]["role"]:
            return 'messages: roles must alternate between "user" and "assistant"'
        content = m.get("content")
        if not content:
            return f"messages.{i}: all messages must have non-empty content"
        for b in content if isinstance(content, list) else ():
            if b.get("type") == "tool_use":
                tool_ids.add(b["id"])
            if b.get("type") == "tool_result" and b.get("tool_use_id") not in tool_ids:
                return f"messages.{i}: tool_result block(s) provided without a matching tool_use"
    for t in body.get("tools") or ():
        if "input_schema" not in t or "name" not in t:
            return "tools.0.input_schema: Field required"
    return None


class FakeAnthropic(ThreadedServer):
    def __init__(self, name: str = "anthropic", api_key: str = "sk-ant-test-key") -> None:
        super().__init__(name)
        self.api_key = api_key
        self.scripts: deque[AnthropicScript] = deque()
        self.default = AnthropicScript()
        self.disconnects = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *scripts: AnthropicScript) -> None:
        self.scripts.extend(scripts)

    def reset(self) -> None:
        self.scripts.clear()
        self.default = AnthropicScript()
        self.requests.clear()
        self.disconnects = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.record(request)
        if request.headers.get("x-api-key") != self.api_key:
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        problem = _invalid(body)
        if problem:
            return _error(400, "invalid_request_error", problem)
        s = self.scripts.popleft() if self.scripts else self.default
        if s.status != 200:
            return _error(s.status, s.error_type or "api_error", s.message, s.headers, s.error_details)
        if not body.get("stream"):
            return web.Response(
                body=orjson.dumps(anthropic_message(s, body["model"])), headers={"Content-Type": "application/json"}
            )
        return await self._stream(request, s, body["model"])

    async def _stream(self, request: web.Request, s: AnthropicScript, model: str) -> web.StreamResponse:
        events = anthropic_events(s, model)
        if s.error_event_after is not None:
            err = {"type": "error", "error": {"type": s.error_event_type, "message": "Overloaded"}}
            events = [*events[: s.error_event_after], _sse(err)]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i, ev in enumerate(events):
                if s.cut_after is not None and i >= s.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                pieces = [ev[j : j + s.split] for j in range(0, len(ev), s.split)] if s.split else [ev]
                for p in pieces:
                    await resp.write(p)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return resp
