"""The upstream client and the mapping of everything that can go wrong upstream to `UpstreamError`.

The transport is gateway/upstream/http1.py (a kept-alive HTTP/1.1 pool written for this hot path; see its
docstring for the measurement behind it). This module is the one place where transport errors, error
statuses (classified by the backend's provider, gateway/providers) and translation failures become
`UpstreamError`, always `from exc`.

Timeouts are explicit and enforced here, not left to library defaults:
  connect     TCP (and TLS) connect             -> kind "timeout_connect"   (retryable: nothing was sent)
  first_byte  request sent -> first body byte   -> kind "timeout_first_byte"
  idle        silence between body chunks       -> kind "timeout_idle"
  total       the whole exchange (a deadline)   -> kind "timeout_total"
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable

from gateway.config import Timeouts
from gateway.errors import UpstreamError
from gateway.providers import Provider, ProviderError, classify_openai
from gateway.upstream.http1 import Connection, Pool, ProtocolError, ProxyError, StaleConnection

__all__ = ["UpstreamClient", "UpstreamResponse", "sanitize"]

_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+|api[-_]?key[\"'=:\s]+\S+)", re.IGNORECASE)
_MAX_ERROR_BODY = 64 * 1024


def sanitize(message: str, secrets: Iterable[str] = ()) -> str:
    """An upstream's error message made safe to show a caller: no credentials, bounded length."""
    for s in secrets:
        if s:
            message = message.replace(s, "[redacted]")
    return _KEYLIKE.sub("[redacted]", message)[:500]


class UpstreamResponse:
    """An upstream response whose headers arrived with a 2xx status. Always `close()` it, exactly once."""

    __slots__ = (
        "_closed",
        "_conn",
        "_deadline",
        "_first_by",
        "_idle",
        "_pool",
        "_provider",
        "_sanitize",
        "headers",
        "status",
    )

    def __init__(
        self,
        pool: Pool,
        conn: Connection,
        idle: float,
        first_by: float,
        deadline: float,
        provider: Provider | None = None,
        sanitize: Callable[[str], str] = str,
    ) -> None:
        self._pool = pool
        # Only a translating provider is kept: OpenAI-compatible bytes pass untouched on the hot path.
        self._provider = provider if provider is not None and provider.translates else None
        self._sanitize = sanitize
        self._conn = conn
        self._idle = idle
        # Until the first body byte the first-byte deadline applies: a stream's headers come at once, its
        # first chunk only after the prompt is processed.
        self._first_by: float | None = first_by
        self._deadline = deadline
        self._closed = False
        self.status = conn.status
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in conn.headers}

    def _budget(self) -> tuple[float, str]:
        now = time.monotonic()
        left = self._deadline - now
        if self._first_by is not None and self._first_by - now < left:
            return max(self._first_by - now, 0.0), "timeout_first_byte"
        if left <= self._idle:
            return max(left, 0.0), "timeout_total"
        return self._idle, "timeout_idle"

    async def _next(self) -> bytes:
        budget, kind = self._budget()
        try:
            async with asyncio.timeout(budget):
                chunk = await self._conn.read_chunk()
        except TimeoutError as exc:
            raise UpstreamError("upstream went silent", kind=kind, retryable=False, status=504) from exc
        except (OSError, ProtocolError) as exc:
            if self._closed:
                raise UpstreamError("upstream response closed by the gateway", kind="closed", retryable=False) from exc
            raise UpstreamError("upstream connection broke mid-response", kind="protocol", retryable=False) from exc
        self._first_by = None
        return chunk

    async def read_raw(self) -> bytes:
        """The body as the upstream sent it (error bodies are read this way, for classification)."""
        parts = []
        while chunk := await self._next():
            parts.append(chunk)
        return b"".join(parts)

    async def read(self) -> bytes:
        """The body as OpenAI's: translated by the backend's provider when it is not OpenAI-compatible."""
        raw = await self.read_raw()
        if self._provider is None:
            return raw
        try:
            return self._provider.response_body(raw)[0]
        except ProviderError as exc:
            raise exc.error.to_error(self._sanitize) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._provider is None:
            while chunk := await self._next():
                yield chunk
            return
        translator = self._provider.stream_translator()
        while chunk := await self._next():
            try:
                out = translator.feed(chunk)
            except ProviderError as exc:
                if exc.pending:
                    yield exc.pending
                raise exc.error.to_error(self._sanitize) from exc
            if out:  # nothing yet (a ping, a held-back role chunk): nothing reached the client
                yield out

    def close(self) -> None:
        """Idempotent. A complete keep-alive response returns its connection to the pool; else it closes."""
        if not self._closed:
            self._closed = True
            if not self._conn.complete:
                self._conn.close()
            self._pool.release(self._conn)


class UpstreamClient:
    """One per process, owned by the app's lifespan: a bounded keep-alive pool."""

    def __init__(self, *, pool_limit: int = 1024, keepalive: float = 60.0) -> None:
        self._pool_limit = pool_limit
        self._keepalive = keepalive
        self._pool: Pool | None = None
        self.secrets: tuple[str, ...] = ()

    async def start(self) -> None:
        self._pool = Pool(self._pool_limit, self._keepalive)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def get_ok(self, url: str, limit_s: float) -> bool:
        """A health probe: True on any 2xx within `limit_s` seconds."""
        try:
            resp = await self._send(b"GET", url, b"", {}, Timeouts(connect=limit_s, first_byte=limit_s, total=limit_s))
        except UpstreamError:
            return False
        try:
            await resp.read()
        except UpstreamError:
            return False
        finally:
            resp.close()
        return True

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts, provider: Provider | None = None
    ) -> UpstreamResponse:
        """Send a request; return once 2xx headers arrived. Anything else raises `UpstreamError`, classified
        by `provider` (OpenAI's rules without one); a translating provider's answer is read as OpenAI's."""
        return await self._send(b"POST", url, body, headers, timeouts, provider)

    async def _send(
        self,
        method: bytes,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeouts: Timeouts,
        provider: Provider | None = None,
    ) -> UpstreamResponse:
        pool = self._pool
        assert pool is not None, "UpstreamClient used outside the app lifespan"
        start = time.monotonic()
        deadline = start + timeouts.total
        first_byte = min(timeouts.first_byte, timeouts.total)
        connect = min(timeouts.connect, timeouts.total)
        conn: Connection | None = None
        try:
            async with asyncio.timeout(max(0.0, start + first_byte - time.monotonic())):
                conn = await pool.request(method, url, headers, body, connect)
                try:
                    await conn.wait_headers()
                except StaleConnection:
                    if not conn.reused:
                        raise
                    # The server had closed this pooled connection: nothing was answered, send again.
                    pool.discard_idle(conn)
                    conn = None
                    conn = await pool.request(method, url, headers, body, connect)
                    await conn.wait_headers()
        except TimeoutError as exc:
            if conn is None:
                raise UpstreamError(
                    "upstream connect timed out", kind="timeout_connect", retryable=True, status=504
                ) from exc
            pool.discard(conn)
            kind = "timeout_first_byte" if first_byte < timeouts.total else "timeout_total"
            raise UpstreamError("upstream did not answer in time", kind=kind, retryable=False, status=504) from exc
        except StaleConnection as exc:
            assert conn is not None
            pool.discard(conn)
            raise UpstreamError("upstream closed the connection", kind="connect", retryable=True) from exc
        except ssl.SSLCertVerificationError as exc:
            # Not a passing fault: the upstream's certificate is not one this machine trusts.
            raise UpstreamError(
                f"upstream TLS certificate not trusted: {exc.verify_message}", kind="tls", retryable=False
            ) from exc
        except ProxyError as exc:
            raise UpstreamError(f"HTTPS proxy: {exc}", kind="proxy", retryable=False) from exc
        except OSError as exc:
            if conn is None:
                raise UpstreamError("upstream refused the connection", kind="connect", retryable=True) from exc
            pool.discard(conn)
            raise UpstreamError("upstream connection broke", kind="protocol", retryable=False) from exc
        except ProtocolError as exc:
            assert conn is not None
            pool.discard(conn)
            raise UpstreamError("upstream sent an invalid response", kind="protocol", retryable=False) from exc
        resp = UpstreamResponse(pool, conn, timeouts.idle, start + first_byte, deadline, provider, self._sanitize)
        if resp.status < 300:
            return resp
        try:
            err_body = (await resp.read_raw())[:_MAX_ERROR_BODY]
        except UpstreamError:
            err_body = b""
        finally:
            resp.close()
        classify = provider.classify_error if provider is not None else classify_openai
        raise classify(resp.status, resp.headers, err_body).to_error(self._sanitize)

    def _sanitize(self, message: str) -> str:
        return sanitize(message, self.secrets)
