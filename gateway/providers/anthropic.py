"""Anthropic's Messages API behind OpenAI's chat completions: the provider and the request translation.

    OpenAI chat request                          Anthropic Messages request
    system / developer messages                  top-level `system` (joined by blank lines, in order)
    user / assistant messages                    the same roles; consecutive same-role messages merged
    assistant tool_calls                         `tool_use` blocks (arguments parsed into `input`)
    tool messages                                user `tool_result` blocks
    image_url parts (data: or http(s) URLs)      `image` blocks (base64 or url source)
    max_completion_tokens / max_tokens           `max_tokens` (required there: the configured default)
    stop (string or list)                        `stop_sequences`
    temperature (0..2)                           `temperature`, clamped to 0..1 (not scaled: 0.7 stays 0.7)
    top_p, top_k                                 the same
    tools (function tools)                       `{name, description, input_schema}`
    tool_choice auto / none / required / named   `{type: auto | none | any | tool}`
    parallel_tool_calls: false                   `tool_choice.disable_parallel_tool_use: true`
    user                                         `metadata.user_id`

Anthropic rejects fields it does not know, so every other field is dropped and named in the log. `n > 1`
and legacy `function` messages cannot be expressed and are refused with a 400. Responses and streams are
translated back in gateway/providers/anthropic_stream.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.protocol import Endpoint
from gateway.providers.anthropic_stream import AnthropicStream, message_to_completion
from gateway.providers.base import ErrorClass, Provider, ProviderError, drop_steering
from gateway.providers.errors import classify_anthropic

__all__ = ["DEFAULT_VERSION", "AnthropicProvider", "to_messages_request"]

log = logging.getLogger("qlp.gateway")

DEFAULT_VERSION = "2023-06-01"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+\-]+);base64,(.+)$", re.IGNORECASE | re.DOTALL)
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "stream",
        "stream_options",
        "n",
    }
)


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_by_provider")


def _text(content: Any, param: str) -> str:
    """A string, or the text parts of a content array joined."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("text", "input_text") or not isinstance(p.get("text"), str):
            raise _bad("only text parts are supported here by this tier's provider", f"{param}[{j}]")
        parts.append(p["text"])
    return "".join(parts)


def _image(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if isinstance(url, str):
        m = _DATA_URL.match(url)
        if m:
            return {"type": "image", "source": {"type": "base64", "media_type": m[1].lower(), "data": m[2]}}
        if url.startswith(("https://", "http://")):
            return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad("image_url must be a data: URL (base64) or an http(s) URL", param)


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, p in enumerate(content or []):
        if isinstance(p, dict) and p.get("type") == "image_url":
            blocks.append(_image(p, f"{param}[{j}]"))
        else:
            text = _text([p], param)
            if text:
                blocks.append({"type": "text", "text": text})
    return blocks


def _tool_use(call: Any, param: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise _bad("tool_calls need an id and a function name", param)
    args = fn.get("arguments") or "{}"
    try:
        value = orjson.loads(args) if isinstance(args, str) else args
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise _bad("tool call arguments must be a JSON object", f"{param}.function.arguments")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": value}


def _messages(messages: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role, content, param = m.get("role"), m.get("content"), f"messages[{i}]"
        if role in ("system", "developer"):
            text = _text(content, f"{param}.content")
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _user_blocks(content, f"{param}.content")
        elif role == "assistant":
            text = _text(content, f"{param}.content")
            blocks = [{"type": "text", "text": text}] if text else []
            blocks += [_tool_use(c, f"{param}.tool_calls[{j}]") for j, c in enumerate(m.get("tool_calls") or [])]
        elif role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise _bad("tool messages need tool_call_id", f"{param}.tool_call_id")
            role = "user"
            blocks = [
                {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": _text(content, f"{param}.content")}
            ]
        else:
            raise _bad(f"role {role!r} is not supported by this tier's provider; use tools", f"{param}.role")
        if not blocks:
            continue  # an empty turn: Anthropic refuses empty content, and it says nothing
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)  # Anthropic wants strict user/assistant alternation
        else:
            out.append({"role": role, "content": blocks})
    if not out:
        raise _bad("the request needs at least one user or assistant message with content", "messages")
    return "\n\n".join(system), out


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("only function tools are supported by this tier's provider", f"tools[{j}]")
        tool: dict[str, Any] = {
            "name": fn["name"],
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if isinstance(fn.get("description"), str):
            tool["description"] = fn["description"]
        out.append(tool)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        tc: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice in ("auto", "none"):
        tc = {"type": choice}
    elif choice == "required":
        tc = {"type": "any"}
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        tc = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _bad("tool_choice must be auto, none, required or a named function", "tool_choice")
    if tc is not None and parallel is False and tc["type"] != "none":
        tc["disable_parallel_tool_use"] = True
    return tc


def to_messages_request(body: Mapping[str, Any], model: str, stream: bool, max_tokens_default: int) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request (see the module docstring)."""
    body = drop_steering(body)
    if body.get("n") not in (None, 1):
        raise _bad("n > 1 is not supported by this tier's provider", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _bad("'messages' must be an array of objects", "messages")
    system, msgs = _messages(messages)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or max_tokens_default
    out: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": msgs}
    if system:
        out["system"] = system
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(max(float(temperature), 0.0), 1.0)
    for name in ("top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    tc = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tc is not None and "tools" in out:
        out["tool_choice"] = tc
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"][:256]}
    if stream:
        out["stream"] = True
    ignored = sorted(k for k in body if k not in _HANDLED)
    if ignored:
        log.info("anthropic provider: request fields with no Messages API equivalent dropped: %s", ",".join(ignored))
    return out


class AnthropicProvider(Provider):
    kind = "anthropic"
    translates = True
    endpoints = frozenset({"chat"})

    def __init__(self, api_version: str | None = None, max_tokens_default: int = 4096) -> None:
        version = api_version or DEFAULT_VERSION
        if not _VERSION.match(version):
            raise ValueError(
                f"anthropic `api_version` (the anthropic-version header) must look like 2023-06-01, got {version!r}"
            )
        if max_tokens_default < 1:
            raise ValueError("max_tokens_default must be at least 1")
        self.api_version = version
        self.max_tokens_default = max_tokens_default

    def path(self, endpoint: Endpoint, model: str) -> str:
        self._check(endpoint)
        return "/messages"

    def headers(self, api_key: str | None, request_id: str) -> dict[str, str]:
        h = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "X-Request-Id": request_id,
            "anthropic-version": self.api_version,
        }
        if api_key:
            h["x-api-key"] = api_key
        return h

    def request_body(self, body: Mapping[str, Any], model: str, stream: bool) -> bytes:
        return orjson.dumps(to_messages_request(body, model, stream, self.max_tokens_default))

    def response_body(self, raw: bytes) -> tuple[bytes, dict[str, Any] | None]:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProviderError(ErrorClass("protocol", False, 502, "upstream sent an invalid response")) from exc
        if not isinstance(msg, dict) or msg.get("type") != "message":
            raise ProviderError(ErrorClass("protocol", False, 502, "upstream sent an invalid response"))
        completion = message_to_completion(msg)
        return orjson.dumps(completion), completion["usage"]

    def stream_translator(self) -> AnthropicStream:
        return AnthropicStream()

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass:
        return classify_anthropic(status, headers, body)
