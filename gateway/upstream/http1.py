"""A small HTTP/1.1 client for the proxy hot path: keep-alive pool, httptools parser, streaming bodies.

Why by hand: on this machine aiohttp's client cost more than everything else in the gateway together
(bench/bench_gateway.py: a bare uvicorn app proxying through aiohttp reached ~4,400 req/s against ~28,700
for the same app without the upstream call). The proxy needs one thing only, POST/GET with a bytes body
to a known upstream over a kept-alive connection, so this module does exactly that:

  * one `Pool` per process; idle connections per (scheme, host, port), bounded in total;
  * requests written in one `transport.write`; responses parsed by httptools (chunked and
    content-length bodies); body chunks handed out as they arrive, with back-pressure (pause_reading);
  * a connection goes back to the pool only after a complete, keep-alive response; anything half-read
    is closed; a pooled connection the server had already closed is retried once on a new one;
  * https verifies the upstream against the system's trust store (`SSL_CERT_FILE` / `SSL_CERT_DIR` name
    another, as for OpenSSL everywhere); `HTTPS_PROXY` (and `NO_PROXY`) send https upstreams through a
    CONNECT tunnel, with `user:password@` as Basic proxy credentials. Plain-http upstreams (the local model
    servers) always connect directly.

Errors raised here are the builtin `OSError`/`ConnectionError`/`TimeoutError` family plus `ProtocolError`;
gateway/upstream/client.py maps them to `UpstreamError` (the one translation boundary).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import time
import urllib.request
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

__all__ = ["Connection", "Pool", "ProtocolError", "ProxyError", "StaleConnection"]

_HIGH_WATER = 1 << 20  # bytes buffered from upstream before we stop reading the socket


class ProtocolError(Exception):
    """The upstream sent something that is not HTTP/1.1."""


class StaleConnection(ConnectionError):
    """A pooled connection was closed by the server before any response byte."""


class ProxyError(ConnectionError):
    """The HTTPS proxy refused or broke the CONNECT tunnel."""


class _Tunnel(asyncio.Protocol):
    """The proxy's answer to CONNECT, up to the blank line; then the socket is TLS's."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if b"\r\n\r\n" in self._buf and not self.answer.done():
            self.answer.set_result(self._buf)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ProxyError("the proxy closed the connection during CONNECT"))


def _https_proxy() -> tuple[str, int, bytes | None] | None:
    """(host, port, Proxy-Authorization value) from HTTPS_PROXY, read once per pool."""
    url = urllib.request.getproxies_environment().get("https")
    if not url:
        return None
    u = urlsplit(url if "://" in url else f"http://{url}")
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"HTTPS_PROXY must be an http:// proxy URL, got scheme {u.scheme!r}")
    auth = None
    if u.username is not None:
        creds = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
        auth = b"Basic " + base64.b64encode(creds)
    return u.hostname, u.port or 3128, auth


class Connection(asyncio.Protocol):
    __slots__ = (
        "_buffered",
        "_chunks",
        "_exc",
        "_headers_done",
        "_parser",
        "_paused",
        "_waiter",
        "complete",
        "got_bytes",
        "headers",
        "idle_since",
        "keep_alive",
        "key",
        "lost",
        "reused",
        "status",
        "transport",
    )

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._reset()
        self.lost = False
        self.reused = False
        self.idle_since = 0.0

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._headers_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            if not self._headers_done.done() and not self.got_bytes:
                self._fail(StaleConnection("connection closed before any response byte"))
            elif self._headers_done.done() and not self._has_length():
                self.complete = True  # a close-delimited body ends here
                self._wake()
            else:
                self._fail(ConnectionResetError("connection closed mid-response"))

    def _has_length(self) -> bool:
        return any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    # -- httptools callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(bytes(body))
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Read keep-alive now: the parser resets its state once the callback returns.
        self.keep_alive = self._parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- used by the client -------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        if not self._headers_done.done():
            self._headers_done.set_exception(exc)
            self._headers_done.exception()  # mark retrieved: nobody may be waiting yet
        self._wake()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def wait_headers(self) -> None:
        await self._headers_done

    async def read_chunk(self) -> bytes:
        """The next body chunk; b"" when the body is complete."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self._exc is not None:
                raise self._exc
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.lost
            and self._exc is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self.keep_alive
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Kept-alive connections per origin; at most `limit` open at once (others wait for a slot)."""

    def __init__(self, limit: int = 1024, keepalive: float = 60.0, max_idle_per_origin: int = 256) -> None:
        self._idle: dict[tuple[str, str, int], collections.deque[Connection]] = collections.defaultdict(
            collections.deque
        )
        self._slots = asyncio.Semaphore(limit)
        self._keepalive = keepalive
        self._max_idle = max_idle_per_origin
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[str, tuple[tuple[str, str, int], str, bytes]] = {}
        self._proxy = _https_proxy()

    def _origin(self, url: str) -> tuple[tuple[str, str, int], str, bytes]:
        """(pool key, path with query, Host header) for a URL; cached since upstream URLs are few."""
        cached = self._origins.get(url)
        if cached is None:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"unsupported upstream URL scheme: {u.scheme!r}")
            port = u.port or (443 if u.scheme == "https" else 80)
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            cached = ((u.scheme, u.hostname, port), path, u.netloc.encode("idna"))
            if len(self._origins) < 4096:
                self._origins[url] = cached
        return cached

    async def _connect(self, key: tuple[str, str, int]) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ctx = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
            if self._proxy is not None and not urllib.request.proxy_bypass(host):
                return await self._connect_tunnel(key, ctx)
        _, conn = await loop.create_connection(
            lambda: Connection(key), host, port, ssl=ctx, server_hostname=host if ctx else None
        )
        return conn

    async def _connect_tunnel(self, key: tuple[str, str, int], ctx: ssl.SSLContext) -> Connection:
        """CONNECT through the HTTPS proxy, then TLS with the upstream over that tunnel."""
        assert self._proxy is not None
        _, host, port = key
        phost, pport, auth = self._proxy
        loop = asyncio.get_running_loop()
        transport, tunnel = await loop.create_connection(_Tunnel, phost, pport)
        try:
            target = f"{host}:{port}".encode("idna")
            head = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n"
            if auth is not None:
                head += b"Proxy-Authorization: " + auth + b"\r\n"
            transport.write(head + b"\r\n")
            answer = await tunnel.answer
            status = answer.split(b"\r\n", 1)[0].split(b" ")
            if len(status) < 2 or status[1] != b"200":
                raise ProxyError(f"the proxy answered CONNECT with {b' '.join(status[1:])[:60].decode('latin-1')}")
            conn = Connection(key)
            tls = await loop.start_tls(transport, conn, ctx, server_hostname=host)
        except BaseException:
            transport.close()
            raise
        assert tls is not None
        conn.connection_made(tls)
        return conn

    def _pop_idle(self, key: tuple[str, str, int]) -> Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if (
                conn.lost
                or conn.transport is None
                or conn.transport.is_closing()
                or now - conn.idle_since > self._keepalive
            ):
                conn.close()
                continue
            return conn
        return None

    async def request(
        self, method: bytes, url: str, headers: dict[str, str], body: bytes, connect_timeout: float
    ) -> Connection:
        """Send a request; return the connection once it is written. The caller awaits `wait_headers()`,
        reads the body, and calls `release()` exactly once."""
        key, path, host = self._origin(url)
        head = [
            method,
            b" ",
            path.encode(),
            b" HTTP/1.1\r\nHost: ",
            host,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for k, v in headers.items():
            if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
                raise ValueError("header names and values may not contain line breaks")
            head += [k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n"]
        head.append(b"\r\n")
        data = b"".join(head) + body
        await self._slots.acquire()
        try:
            conn = self._pop_idle(key)
            if conn is not None:
                conn._reset()
                conn.reused = True
                conn.send(data)
                return conn
            async with asyncio.timeout(connect_timeout):
                conn = await self._connect(key)
            conn.send(data)
            return conn
        except BaseException:
            self._slots.release()
            raise

    def discard(self, conn: Connection) -> None:
        """Close a connection whose exchange failed and free its slot."""
        conn.close()
        self.release(conn)

    def discard_idle(self, stale: Connection) -> None:
        """`stale` was closed by the server while idle: drop it and its idle siblings (likely stale too)."""
        self.discard(stale)
        for conn in self._idle.pop(stale.key, ()):
            conn.close()

    def release(self, conn: Connection) -> None:
        """Give the connection back: to the idle pool if reusable, else closed. Frees its slot."""
        self._slots.release()
        if conn.reusable():
            idle = self._idle[conn.key]
            if len(idle) < self._max_idle:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def stats(self) -> dict[str, Any]:
        return {"idle": sum(len(v) for v in self._idle.values())}
