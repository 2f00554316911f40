"""An HTTPS forward proxy on loopback: answers CONNECT (checking Basic credentials when it has some) and pipes
the tunnel's bytes both ways. It records each CONNECT's target and Proxy-Authorization."""

from __future__ import annotations

import asyncio
import base64
import contextlib

from tests.fakes.threaded import LoopThread

__all__ = ["ConnectProxy"]


class ConnectProxy(LoopThread):
    def __init__(self, credentials: str | None = None) -> None:
        super().__init__("connect-proxy")
        self.credentials = credentials  # "user:password" it requires, None: open
        self.connects: list[tuple[str, str | None]] = []  # (target, Proxy-Authorization)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
            auth = fields.get("Proxy-Authorization")
            self.connects.append((target, auth))
            want = None if self.credentials is None else "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if method != "CONNECT" or auth != want:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()
