"""The capture record: built from a served exchange, in the shape the trainer reads (docs/capture.md).

    {"request_id", "time" (ISO 8601 UTC), "ts" (epoch ms), "tenant", "tier", "requested_tier", "agent",
     "workflow", "backend", "model", "arm", "endpoint", "stream", "messages", "response", "finish_reason",
     "usage", "latency_ms", "outcome": null}

`messages` are normalised to what `trainer.records.read_capture` accepts: `content` is always a string
(text parts joined, non-text parts such as images dropped, a null content of an assistant tool-call turn
becomes ""), the legacy role `function` becomes `tool`; `name`, `tool_call_id` and `tool_calls` are kept.
Every string of messages and response is redacted. An exchange that has no reply text (only tool calls,
a stream cut before `[DONE]`, an in-band error event) yields no record: a partial or empty reply would
teach the model to stop mid-answer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.capture.redact import Redactor
from gateway.sse import EventBuffer, data_of, events_of

__all__ = ["Pending", "build_record", "iso_time", "normalise_messages", "reply_text"]

ROLE_MAP = {"function": "tool"}  # the trainer knows system, developer, user, assistant, tool
KEPT_FIELDS = ("name", "tool_call_id", "tool_calls")


@dataclass(slots=True)
class Pending:
    """One exchange as it was when submitted (the Exchange object may still change afterwards)."""

    request_id: str
    time_s: float
    latency_ms: int
    endpoint: str
    stream: bool
    tier: str | None
    requested_tier: str | None
    backend: str | None
    model: str | None
    agent: str
    workflow: str | None
    tenant: str | None
    arm: str | None
    usage: dict[str, Any] | None
    body: dict[str, Any]
    response: bytes


def iso_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # parts: keep the text ones
        return "\n".join(
            p["text"]
            for p in value
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def normalise_messages(messages: Any) -> list[dict[str, Any]] | None:
    if not isinstance(messages, list) or not messages:
        return None
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return None
        msg: dict[str, Any] = {"role": ROLE_MAP.get(m["role"], m["role"]), "content": _content(m.get("content"))}
        for k in KEPT_FIELDS:
            if m.get(k) is not None:
                msg[k] = m[k]
        out.append(msg)
    return out


def _choice0(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict):
        return None
    for c in doc.get("choices") or ():
        if isinstance(c, dict) and c.get("index", 0) == 0:
            return c
    return None


def reply_text(response: bytes, stream: bool) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(reply text of choice 0 or None, finish_reason, usage in the body) of a chat or text completion."""
    if not stream:
        try:
            doc = orjson.loads(response)
        except orjson.JSONDecodeError:
            return None, None, None
        c = _choice0(doc)
        usage = doc.get("usage") if isinstance(doc, dict) else None
        if c is None:
            return None, None, usage
        msg = c.get("message")
        text = msg.get("content") if isinstance(msg, dict) else c.get("text")
        return (text if isinstance(text, str) else None), c.get("finish_reason"), usage
    parts: list[str] = []
    finish = usage = None
    done = False
    events = EventBuffer()
    for event in events_of(events.feed(response) + events.rest() + b"\n\n"):
        data = data_of(event)
        if data is None:
            continue
        if data == b"[DONE]":
            done = True
            break
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None, None, None
        if not isinstance(doc, dict) or "error" in doc:
            return None, None, None  # an in-band error: the reply is not whole
        usage = doc.get("usage") or usage
        c = _choice0(doc)
        if c is None:
            continue
        delta = c.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else c.get("text")
        if isinstance(piece, str):
            parts.append(piece)
        finish = c.get("finish_reason") or finish
    if not done:
        return None, None, usage
    return "".join(parts), finish, usage


def build_record(p: Pending, redactor: Redactor) -> dict[str, Any] | None:
    """The redacted record of one exchange, or None when it cannot be captured (see the module doc)."""
    if p.endpoint == "chat":
        messages = normalise_messages(p.body.get("messages"))
    else:
        prompt = p.body.get("prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None
    if messages is None:
        return None
    text, finish, body_usage = reply_text(p.response, p.stream)
    if not text:
        return None
    return {
        "request_id": p.request_id,
        "time": iso_time(p.time_s),
        "ts": int(p.time_s * 1000),
        "tenant": p.tenant,
        "tier": p.tier,
        "requested_tier": p.requested_tier,
        "agent": p.agent,
        "workflow": p.workflow,
        "backend": p.backend,
        "model": p.model,
        "arm": p.arm,
        "endpoint": p.endpoint,
        "stream": p.stream,
        "messages": redactor.obj(messages),
        "response": redactor.text(text),
        "finish_reason": finish,
        "usage": p.usage or body_usage,
        "latency_ms": p.latency_ms,
        "outcome": None,
    }
