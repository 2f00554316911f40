"""The provider interface: how one kind of upstream API is addressed, authenticated and translated.

A `Provider` is built once per configured backend from configuration only (`provider_for`). Its outputs
that decide where the gateway connects and what it sends as credentials (`path`, `headers`) take no request
data except the endpoint and the configured model, so nothing a caller sends can steer them.

The gateway speaks OpenAI on both sides of a translating provider: `request_body` turns the (parsed, routing
fields dropped) OpenAI request into the provider's, `response_body` and the `stream_translator` turn the
provider's answer back into OpenAI's `chat.completion` / `chat.completion.chunk` SSE, ending with a usage
chunk and `data: [DONE]` exactly when the provider's stream ended properly. For OpenAI-compatible kinds
every translation is the identity and `translates` is False, so the hot path can skip it.

Failures are described, not raised as `UpstreamError`: `classify_error` returns an `ErrorClass`, and a
translator raises `ProviderError(ErrorClass)`. `gateway/upstream/client.py` stays the one place where they
become `UpstreamError` (`ErrorClass.to_error`, with its secret-redacting `sanitize`), always `from exc`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import orjson

from gateway.errors import UpstreamError
from gateway.protocol import ROUTING_FIELDS, Endpoint

__all__ = ["ErrorClass", "Passthrough", "Provider", "ProviderError", "StreamTranslator", "drop_steering"]

# Body fields that name hosts, headers or credentials in some SDKs or gateways. parse_request already drops
# ROUTING_FIELDS; providers drop these again (and the rest) so no request can reach an upstream with them.
STEERING_FIELDS = (
    *ROUTING_FIELDS,
    "extra_headers",
    "extra_query",
    "api_type",
    "azure_endpoint",
    "azure_deployment",
    "deployment_id",
    "engine",
    "host",
    "url",
)


def drop_steering(body: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of `body` without any field that could name a host, header or credential."""
    return {k: v for k, v in body.items() if k not in STEERING_FIELDS}


@dataclass(frozen=True, slots=True)
class ErrorClass:
    """What an upstream failure means for the attempt loop and for the caller.

    kind: the metrics/error code (status_429, quota_exceeded, overloaded, upstream_auth, rejected, ...).
    retryable: whether another attempt (after `retry_after`, if set) may help.
    status: the HTTP status the caller gets if this failure ends the request.
    message: for the caller; may hold the upstream's own message, so it is sanitized by `to_error`.
    """

    kind: str
    retryable: bool
    status: int
    message: str
    upstream_status: int | None = None
    retry_after: float | None = None
    param: str | None = None  # a rejected request: the field the upstream named (OpenAI's `param`)
    code: str | None = None  # ... and its error code, when it gave a string one

    def to_error(self, sanitize: Callable[[str], str]) -> UpstreamError:
        return UpstreamError(
            sanitize(self.message),
            kind=self.kind,
            retryable=self.retryable,
            status=self.status,
            upstream_status=self.upstream_status,
            retry_after=self.retry_after,
            param=self.param,
            upstream_code=self.code,
        )


class ProviderError(Exception):
    """A translator met a failure in a 2xx response: an in-band `error` event, or bytes it cannot read.

    `pending` holds the OpenAI output translated from the same chunk before the failure: forward it first.
    """

    def __init__(self, error: ErrorClass, pending: bytes = b"") -> None:
        super().__init__(error.message)
        self.error = error
        self.pending = pending


class StreamTranslator(Protocol):
    def feed(self, chunk: bytes) -> bytes:
        """Provider bytes in (split anywhere), complete OpenAI SSE events out (maybe b"")."""
        ...


class Passthrough:
    """The identity translator of OpenAI-compatible providers."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:
        return chunk


class Provider(abc.ABC):
    kind: ClassVar[str]
    translates: ClassVar[bool] = False  # False: request/response/stream translation is the identity
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset({"chat", "completions"})

    @abc.abstractmethod
    def path(self, endpoint: Endpoint, model: str) -> str:
        """The URL path (and query) appended to the backend's configured `base_url`."""

    @abc.abstractmethod
    def headers(self, api_key: str | None, request_id: str) -> dict[str, str]:
        """Every header the gateway sends upstream: content type, credentials, correlation id."""

    @abc.abstractmethod
    def request_body(self, body: Mapping[str, Any], model: str, stream: bool) -> bytes:
        """The upstream request from the client's parsed OpenAI body. May raise `InvalidRequest`."""

    @abc.abstractmethod
    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass:
        """A non-2xx answer (`headers` with lower-case names) mapped to retry rules and the caller's status."""

    def response_body(self, raw: bytes) -> tuple[bytes, dict[str, Any] | None]:
        """A non-streamed 2xx body as OpenAI's bytes, and its OpenAI `usage` (None if absent)."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw, None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        return raw, usage if isinstance(usage, dict) else None

    def stream_translator(self) -> StreamTranslator:
        """A fresh translator for one streamed response."""
        return Passthrough()

    def _check(self, endpoint: Endpoint) -> None:
        if endpoint not in self.endpoints:
            raise ValueError(f"{self.kind} providers do not serve the {endpoint} endpoint")
