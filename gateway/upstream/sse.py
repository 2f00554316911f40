"""Server-sent events passed through without re-encoding, with the usage chunk taken out when asked.

The gateway always asks the upstream for usage (`stream_options.include_usage`) so metering has exact
counts; a client that did not ask for it must not see the extra chunk. Events are forwarded as they came
(line ends normalised to LF, gateway/sse.py); only an event that carries usage is parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sse import EventBuffer, data_of, events_of

__all__ = ["SSEFilter"]


class SSEFilter:
    """Feed upstream bytes; get back complete events to forward. Tracks `[DONE]` and the usage seen."""

    __slots__ = ("_events", "done", "events", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self._events = EventBuffer()
        self.done = False
        self.usage: dict[str, Any] | None = None
        self.events = 0  # JSON data events seen (a rough output-token proxy when no usage comes)

    def feed(self, chunk: bytes) -> bytes:
        complete = self._events.feed(chunk)
        if not complete:
            return b""
        if b"[DONE]" in complete and any(data_of(e) == b"[DONE]" for e in events_of(complete)):
            self.done = True
        self.events += complete.count(b"data: {") + complete.count(b"data:{")
        if b'"usage"' not in complete:
            return complete
        return self._take_usage(complete)

    def _take_usage(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        for event in events_of(complete):
            data = data_of(event) if b'"usage"' in event else None
            if data is not None and data.startswith(b"{"):
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]
                    if self.strip_usage:
                        if not obj.get("choices"):
                            continue  # the usage-only chunk: drop it
                        del obj["usage"]
                        event = b"data: " + orjson.dumps(obj)
            out.append(event + b"\n\n")
        return b"".join(out)

    def tail(self) -> bytes:
        """Whatever incomplete event is left when the upstream closed."""
        rest = self._events.rest()
        if data_of(rest.strip(b"\n")) == b"[DONE]":
            self.done = True
        return rest
