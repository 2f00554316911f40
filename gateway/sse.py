"""Server-sent events as the WHATWG spec reads them: the one parser of the gateway's streams.

Lines end with CRLF, LF or CR (a CRLF may be split across two reads); a blank line ends an event; a line
`data:value` or `data: value` (one leading space dropped) adds to the event's data, several joined by LF;
lines starting with `:` are comments. Used by the relay (gateway/upstream/sse.py), the Anthropic stream
translation and the capture's reading of a recorded stream.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["EventBuffer", "data_of", "events_of"]


def _normalise(buf: bytes) -> bytes:
    return buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in buf else buf


class EventBuffer:
    """Feed bytes split anywhere; get back the complete events so far, LF-terminated, as one block."""

    __slots__ = ("_buf", "_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._cr = False  # the last read ended in CR: a LF opening the next one is that line's end

    def feed(self, chunk: bytes) -> bytes:
        """Complete events (each ending in a blank line), or b"" while none is complete."""
        if not chunk:
            return b""
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._cr = chunk.endswith(b"\r")
        buf = self._buf + _normalise(chunk) if self._buf else _normalise(chunk)
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return b""
        complete, self._buf = buf[: cut + 2], buf[cut + 2 :]
        return complete

    def rest(self) -> bytes:
        """What is left of an event the stream never finished."""
        rest, self._buf = self._buf, b""
        return rest


def events_of(block: bytes) -> Iterator[bytes]:
    """The events of a normalised block (LF line ends), without their blank-line terminator."""
    for event in block.split(b"\n\n"):
        if event.strip(b"\n"):
            yield event.strip(b"\n")


def data_of(event: bytes) -> bytes | None:
    """The event's data (its `data` lines joined by LF), or None when it has none."""
    if b"\n" not in event:  # the common case: one line
        if not event.startswith(b"data:"):
            return None
        v = event[5:]
        return v[1:] if v.startswith(b" ") else v
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            v = line[5:]
            parts.append(v[1:] if v.startswith(b" ") else v)
        elif line == b"data":
            parts.append(b"")
    return b"\n".join(parts) if parts else None
