"""The pooled HTTP client (aiohttp) and the mapping of everything that can go wrong upstream.

aiohttp was chosen by measurement (bench/bench_gateway.py; see docs/architecture.md): at 32 connections on
loopback it sustains several times the request rate of httpx's default pool in the same process. Everything
aiohttp-specific stays in this module so the library can be swapped.

Timeouts are explicit and enforced here, not left to library defaults:
  connect     TCP connect                      -> kind "timeout_connect"   (retryable: nothing was sent)
  first_byte  request sent -> first body byte  -> kind "timeout_first_byte"
  idle        silence between body chunks      -> kind "timeout_idle"
  total       the whole exchange (a deadline)  -> kind "timeout_total"
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterable
from email.utils import parsedate_to_datetime

import aiohttp
import orjson

from gateway.config import Timeouts
from gateway.errors import UpstreamError

__all__ = ["UpstreamClient", "UpstreamResponse", "sanitize"]

_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+|api[-_]?key[\"'=:\s]+\S+)", re.IGNORECASE)
_MAX_ERROR_BODY = 64 * 1024


def sanitize(message: str, secrets: Iterable[str] = ()) -> str:
    """An upstream's error message made safe to show a caller: no credentials, bounded length."""
    for s in secrets:
        if s:
            message = message.replace(s, "[redacted]")
    return _KEYLIKE.sub("[redacted]", message)[:500]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _upstream_message(body: bytes) -> str:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(obj.get("message"), str):
            return str(obj["message"])
    return ""


class UpstreamResponse:
    """An upstream response whose headers have arrived with a 2xx status. Always `close()` it."""

    __slots__ = ("_deadline", "_first_by", "_idle", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, idle: float, first_by: float, deadline: float) -> None:
        self._resp = resp
        self._idle = idle
        # Until the first body byte, the first-byte deadline applies: a stream's headers come at once,
        # its first chunk only after the prompt is processed.
        self._first_by: float | None = first_by
        self._deadline = deadline
        self.status = resp.status
        self.headers = resp.headers

    def _budget(self) -> tuple[float, str]:
        now = time.monotonic()
        left = self._deadline - now
        if self._first_by is not None and self._first_by - now < left:
            return max(self._first_by - now, 0.0), "timeout_first_byte"
        if left <= self._idle:
            return max(left, 0.0), "timeout_total"
        return self._idle, "timeout_idle"

    async def read(self) -> bytes:
        budget, kind = self._budget()
        try:
            async with asyncio.timeout(budget):
                return await self._resp.read()
        except TimeoutError as exc:
            raise UpstreamError("upstream stopped sending the response", kind=kind, retryable=False, status=504) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("upstream connection broke while sending the response",
                                kind="protocol", retryable=False) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        while True:
            budget, kind = self._budget()
            try:
                async with asyncio.timeout(budget):
                    chunk = await content.readany()
            except TimeoutError as exc:
                raise UpstreamError("upstream stream went silent", kind=kind, retryable=False, status=504) from exc
            except aiohttp.ClientError as exc:
                raise UpstreamError("upstream connection broke mid-stream", kind="protocol", retryable=False) from exc
            if not chunk:
                return
            self._first_by = None
            yield chunk

    def close(self) -> None:
        # close(), not release(): a half-read stream must not go back to the pool.
        self._resp.close()


class UpstreamClient:
    """One per process, owned by the app's lifespan: a bounded keep-alive pool."""

    def __init__(self, *, pool_limit: int = 1024, keepalive: float = 60.0) -> None:
        self._pool_limit = pool_limit
        self._keepalive = keepalive
        self._session: aiohttp.ClientSession | None = None
        self.secrets: tuple[str, ...] = ()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_limit, limit_per_host=0, keepalive_timeout=self._keepalive, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_ok(self, url: str, limit_s: float) -> bool:
        """A health probe: True on any 2xx within `limit_s` seconds."""
        assert self._session is not None
        try:
            async with asyncio.timeout(limit_s), self._session.get(url) as resp:
                return 200 <= resp.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeouts: Timeouts) -> UpstreamResponse:
        """Send a request; return once 2xx headers arrived. Anything else raises `UpstreamError`."""
        assert self._session is not None, "UpstreamClient used outside the app lifespan"
        start = time.monotonic()
        deadline = start + timeouts.total
        first_byte = min(timeouts.first_byte, timeouts.total)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, connect=timeouts.connect)
        try:
            async with asyncio.timeout(first_byte):
                resp = await self._session.post(url, data=body, headers=headers, timeout=timeout)
        except (aiohttp.ConnectionTimeoutError, aiohttp.ServerTimeoutError) as exc:
            # Before TimeoutError: aiohttp's timeouts subclass it.
            raise UpstreamError("upstream connect timed out", kind="timeout_connect", retryable=True, status=504) from exc
        except TimeoutError as exc:
            kind = "timeout_first_byte" if first_byte < timeouts.total else "timeout_total"
            raise UpstreamError("upstream did not answer in time", kind=kind, retryable=False, status=504) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError("upstream refused the connection", kind="connect", retryable=True) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # A kept-alive connection the upstream had closed, or a reset before any byte: safe to retry.
            raise UpstreamError("upstream closed the connection", kind="connect", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("upstream sent an invalid response", kind="protocol", retryable=False) from exc
        if resp.status < 300:
            return UpstreamResponse(resp, timeouts.idle, start + first_byte, deadline)
        try:
            async with asyncio.timeout(max(0.1, min(timeouts.idle, deadline - time.monotonic()))):
                err_body = await resp.content.read(_MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            err_body = b""
        finally:
            resp.close()
        raise self._status_error(resp.status, resp.headers.get("Retry-After"), err_body)

    def _status_error(self, status: int, retry_after_header: str | None, body: bytes) -> UpstreamError:
        detail = sanitize(_upstream_message(body), self.secrets)
        if status == 429:
            ra = _retry_after(retry_after_header)
            return UpstreamError(
                "upstream rate limit" + (f": {detail}" if detail else ""),
                kind="status_429", retryable=ra is not None, status=429, upstream_status=status, retry_after=ra,
            )
        if status in (401, 403):
            # The caller's key was fine (we checked it); the gateway's own upstream credentials were refused.
            return UpstreamError("upstream refused the gateway's credentials", kind="upstream_auth",
                                 retryable=False, status=502, upstream_status=status)
        if 400 <= status < 500:
            return UpstreamError(detail or f"upstream rejected the request ({status})", kind="rejected",
                                 retryable=False, status=status, upstream_status=status, upstream_body=body)
        if status in (502, 503, 504):
            return UpstreamError(f"upstream unavailable ({status})", kind="status_5xx", retryable=True,
                                 status=status, upstream_status=status, retry_after=_retry_after(retry_after_header))
        return UpstreamError(f"upstream failed ({status})", kind="status_5xx", retryable=False,
                             status=502, upstream_status=status)
