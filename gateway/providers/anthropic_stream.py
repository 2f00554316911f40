"""Anthropic Messages responses and streams, translated to OpenAI chat completions and chunks.

    Anthropic                                    OpenAI
    text blocks                                  message.content (joined) / delta.content
    tool_use blocks                              message.tool_calls / delta.tool_calls (arguments as JSON text)
    stop_reason end_turn, stop_sequence,         finish_reason stop
      pause_turn
    stop_reason max_tokens / tool_use / refusal  length / tool_calls / content_filter
    usage input_tokens, output_tokens,           usage prompt_tokens (= input + cache read + cache write),
      cache_read_input_tokens,                     completion_tokens, total_tokens,
      cache_creation_input_tokens                  prompt_tokens_details {cached_tokens, cache_creation_tokens}

Stream events: message_start (id, model, input and cache usage), content_block_start (a tool_use block
opens a tool call: id and name), content_block_delta (text_delta, input_json_delta), content_block_stop,
message_delta (stop_reason -> the finish chunk; cumulative usage), message_stop (-> the usage chunk with
`choices: []`, then `data: [DONE]`), ping (nothing), error (-> ProviderError). Thinking blocks and event
types this code does not know are skipped, as Anthropic asks clients to do.

The role chunk is held back until the first content: until then nothing has reached the caller, so an
`overloaded_error` right after message_start can still be retried or fall back. Usage is built by the same
function streamed and not, so the same exchange costs the same either way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.providers.base import ErrorClass, ProviderError
from gateway.providers.errors import anthropic_event_error
from gateway.sse import EventBuffer, data_of, events_of

__all__ = ["AnthropicStream", "finish_reason", "message_to_completion", "usage_from"]

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_DONE = b"data: [DONE]\n\n"


def finish_reason(stop_reason: Any) -> str:
    return _FINISH.get(str(stop_reason), "stop")


def _count(u: Mapping[str, Any], key: str) -> int:
    v = u.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def usage_from(u: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI usage from Anthropic's, whose input_tokens excludes the cache reads and writes."""
    read, write = _count(u, "cache_read_input_tokens"), _count(u, "cache_creation_input_tokens")
    prompt = _count(u, "input_tokens") + read + write
    completion = _count(u, "output_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_creation_tokens": write},
    }


def _arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def message_to_completion(msg: Mapping[str, Any], created: int | None = None) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": _arguments(block.get("input"))},
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    usage = msg.get("usage")
    return {
        "id": msg.get("id"),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": msg.get("model"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason(msg.get("stop_reason")), "logprobs": None}
        ],
        "usage": usage_from(usage if isinstance(usage, dict) else {}),
    }


class AnthropicStream:
    """Feed Anthropic SSE bytes split anywhere; get complete OpenAI SSE events back."""

    def __init__(self, created: int | None = None) -> None:
        self._events = EventBuffer()
        self._id = ""
        self._model = ""
        self._created = created or int(time.time())
        self._role_sent = False
        self._tools: dict[int, int] = {}  # content block index -> OpenAI tool call index
        self._usage: dict[str, int] = {}
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for event in events_of(self._events.feed(chunk)):
            data = data_of(event)
            if not data or self.done:
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise ProviderError(
                    ErrorClass("protocol", False, 502, "upstream sent an invalid stream event"), b"".join(out)
                ) from exc
            if not isinstance(obj, dict):
                continue
            if obj.get("type") == "error":
                raise ProviderError(anthropic_event_error(obj.get("error")), b"".join(out))
            self._event(obj, out)
        return b"".join(out)

    # -- events ------------------------------------------------------------------------------------------
    def _event(self, ev: dict[str, Any], out: list[bytes]) -> None:
        kind = ev.get("type")
        if kind == "message_start":
            msg = _obj(ev.get("message"))
            self._id, self._model = str(msg.get("id") or ""), str(msg.get("model") or "")
            self._take_usage(msg.get("usage"))
        elif kind == "content_block_start":
            block = _obj(ev.get("content_block"))
            if block.get("type") == "tool_use":
                n = self._tools[_index(ev)] = len(self._tools)
                self._chunk(
                    out,
                    {
                        "tool_calls": [
                            {
                                "index": n,
                                "id": block.get("id"),
                                "type": "function",
                                "function": {"name": block.get("name"), "arguments": ""},
                            }
                        ]
                    },
                )
            elif block.get("type") == "text" and block.get("text"):
                self._chunk(out, {"content": block["text"]})
        elif kind == "content_block_delta":
            delta = _obj(ev.get("delta"))
            if delta.get("type") == "text_delta" and delta.get("text"):
                self._chunk(out, {"content": delta["text"]})
            elif delta.get("type") == "input_json_delta" and _index(ev) in self._tools and delta.get("partial_json"):
                self._chunk(
                    out,
                    {
                        "tool_calls": [
                            {"index": self._tools[_index(ev)], "function": {"arguments": delta["partial_json"]}}
                        ]
                    },
                )
        elif kind == "message_delta":
            self._take_usage(ev.get("usage"))
            delta = _obj(ev.get("delta"))
            if delta.get("stop_reason") is not None:
                self._chunk(out, {}, finish_reason(delta["stop_reason"]))
        elif kind == "message_stop":
            self._role(out)
            out.append(b"data: " + orjson.dumps({**self._head(), "choices": [], "usage": self.usage}) + b"\n\n")
            out.append(_DONE)
            self.done = True
        # content_block_stop, ping and unknown types: nothing to say

    @property
    def usage(self) -> dict[str, Any]:
        return usage_from(self._usage)

    def _take_usage(self, u: Any) -> None:
        # message_start carries input and cache counts; message_delta's counts are cumulative totals.
        if isinstance(u, dict):
            for key in _USAGE_KEYS:
                if isinstance(u.get(key), int):
                    self._usage[key] = u[key]

    def _head(self) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model}

    def _role(self, out: list[bytes]) -> None:
        if not self._role_sent:
            self._role_sent = True
            self._emit(out, {"role": "assistant", "content": ""}, None)

    def _chunk(self, out: list[bytes], delta: dict[str, Any], finish: str | None = None) -> None:
        self._role(out)
        self._emit(out, delta, finish)

    def _emit(self, out: list[bytes], delta: dict[str, Any], finish: str | None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        out.append(b"data: " + orjson.dumps({**self._head(), "choices": [choice]}) + b"\n\n")


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _index(ev: Mapping[str, Any]) -> int:
    i = ev.get("index")
    return i if isinstance(i, int) else -1
