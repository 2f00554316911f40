"""Raw ASGI helpers for the hot path: bounded body reading and responses without a framework in between.

The proxy routes are plain ASGI callables (see gateway/app.py for why): these helpers are all they need.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from gateway.errors import BodyTooLarge, GatewayError, InvalidRequest

__all__ = ["ClientDisconnected", "Headers", "read_body", "request_id", "send_error", "send_json", "with_request_id"]

Headers = list[tuple[bytes, bytes]]
Receive = object  # typed loosely: ASGI callables
JSON = b"application/json"


_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(given: bytes | None) -> str:
    """The caller's X-Request-Id when it is a sane token, else a fresh one."""
    return given.decode() if given is not None and _REQUEST_ID.match(given) else os.urandom(16).hex()


def with_request_id(send: Any, rid: str) -> Any:
    """`send` that adds X-Request-Id to the response (for routes that do not set it themselves)."""
    value = rid.encode()

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(k.lower() == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", value)]}
        await send(message)

    return sending


class ClientDisconnected(Exception):
    """The client went away; nothing more can be sent."""


def header(scope_headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in scope_headers:
        if k == name:
            return v
    return None


async def read_body(receive, scope_headers: Iterable[tuple[bytes, bytes]], limit: int) -> bytes:  # type: ignore[no-untyped-def]
    """The whole body, or 413 as soon as it is known to exceed `limit` (chunked bodies included)."""
    length = None
    ctype = None
    for k, v in scope_headers:
        if k == b"content-length":
            length = v
        elif k == b"content-type":
            ctype = v
    if ctype is not None and not ctype.split(b";", 1)[0].strip().lower().endswith(b"json"):
        raise InvalidRequest("Content-Type must be application/json", code="unsupported_content_type")
    if length is not None:
        try:
            declared = int(length)
        except ValueError as exc:
            raise InvalidRequest("invalid Content-Length header", code="invalid_header") from exc
        if declared > limit:
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(send, status: int, body: bytes, headers: Headers) -> None:  # type: ignore[no-untyped-def]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send, exc: GatewayError, headers: Headers) -> None:  # type: ignore[no-untyped-def]
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.response_headers().items()]
    await send_json(send, exc.status, exc.body(), [*headers, *extra])
