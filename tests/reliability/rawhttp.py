"""Raw HTTP/1.1 over a loopback socket: for requests no well-behaved client library would send."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import orjson

__all__ = ["RawResponse", "exchange"]


@dataclass
class RawResponse:
    status: int  # 0: the server closed without an answer
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> object:
        return orjson.loads(self.body)


def exchange(
    port: int, head: bytes, body: bytes = b"", *, chunks: list[bytes] | None = None, timeout: float = 10.0
) -> RawResponse:
    """Send `head` (request line and headers, without the blank line) and a body, as is; read one response.
    `chunks`: send the body with Transfer-Encoding: chunked, stopping early if the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if chunks is None:
            s.sendall(head + b"\r\n\r\n" + body)
        else:
            s.sendall(head + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            s.setblocking(False)
            for c in chunks:
                try:
                    s.sendall(b"%x\r\n%s\r\n" % (len(c), c))
                except (BlockingIOError, OSError):
                    break  # the server stopped reading (it answered and closed): fine
                if _readable(s):
                    break
            else:
                try:
                    s.sendall(b"0\r\n\r\n")
                except OSError:
                    pass
            s.setblocking(True)
            s.settimeout(timeout)
        return _read_response(s, timeout)


def _readable(s: socket.socket) -> bool:
    try:
        return bool(s.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _read_response(s: socket.socket, timeout: float) -> RawResponse:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            return RawResponse(0, [], buf)
        buf += data
        if time.monotonic() > deadline:
            raise TimeoutError("no complete response head")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
    while length is not None and len(rest) < length:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        rest += data
    return RawResponse(status, headers, rest if length is None else rest[:length])
