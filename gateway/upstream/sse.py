"""Server-sent events passed through without re-encoding, with the usage chunk taken out when asked.

The gateway always asks the upstream for usage (`stream_options.include_usage`) so metering has exact
counts; a client that did not ask for it must not see the extra chunk. Events are forwarded byte for byte;
only an event that carries usage is parsed.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["SSEFilter"]

_DONE = b"data: [DONE]"


class SSEFilter:
    """Feed upstream bytes; get back complete events to forward. Tracks `[DONE]` and the usage seen."""

    __slots__ = ("_buf", "done", "events", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self._buf = b""
        self.done = False
        self.usage: dict[str, Any] | None = None
        self.events = 0  # data events with choices forwarded (a rough output-token proxy)

    def feed(self, chunk: bytes) -> bytes:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return b""
        complete, self._buf = buf[: cut + 2], buf[cut + 2 :]
        if _DONE in complete:
            self.done = True
        self.events += complete.count(b"data: {")
        if b'"usage":{' not in complete and b'"usage": {' not in complete:
            return complete
        return self._take_usage(complete)

    def _take_usage(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            if event.startswith(b"data: {") and (b'"usage":{' in event or b'"usage": {' in event):
                try:
                    obj = orjson.loads(event[6:])
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]
                    if self.strip_usage:
                        if not obj.get("choices"):
                            continue  # the usage-only chunk: drop it
                        obj["usage"] = None
                        event = b"data: " + orjson.dumps(obj)
            out.append(event + b"\n\n")
        return b"".join(out)

    def tail(self) -> bytes:
        """Whatever incomplete event is left when the upstream closed."""
        rest, self._buf = self._buf, b""
        if _DONE in rest:
            self.done = True
        return rest
