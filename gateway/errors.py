"""The gateway's exception tree and OpenAI's error envelope.

    GatewayError                      -> rendered as {"error": {message, type, param, code}}
      InvalidRequest (400)            bad JSON, bad field, unknown tier
      AuthenticationError (401)
      PermissionDenied (403)
      NotFound (404)                  unknown model / route
      BodyTooLarge (413)
      RateLimited (429)               with Retry-After
      UpstreamError (502/503/504)     raised only by gateway.upstream, which maps transport errors; an
                                      upstream 4xx (`rejected`) renders as invalid_request_error

Every route renders errors through `envelope()`; nothing else writes an error body. Messages are written
for the caller and never carry upstream secrets or stack traces.

Every error also says whether a retry can help (`x-should-retry`, which OpenAI's SDKs obey before their own
status rules): client errors and a spent budget never, a rate limit or a busy fleet yes, with `Retry-After`
when the wait is known.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

__all__ = [
    "AuthenticationError",
    "BodyTooLarge",
    "GatewayError",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServiceUnavailable",
    "UpstreamError",
    "envelope",
]


class GatewayError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None
    should_retry = False  # may the same request succeed later? (x-should-retry)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if should_retry is not None:
            self.should_retry = should_retry
        self.headers = headers or {}

    def body(self) -> bytes:
        return envelope(self.message, self.type, self.param, self.code)

    def response_headers(self) -> dict[str, str]:
        """The headers every rendering of this error carries (the hot path's and FastAPI's alike)."""
        return {**self.headers, "x-should-retry": "true" if self.should_retry else "false"}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    should_retry = True


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    should_retry = True  # unless the fleet is missing configuration (should_retry=False)


class UpstreamError(GatewayError):
    """An upstream failed. `retryable` says whether another attempt may help; `kind` names the failure
    for metrics (connect, timeout_first_byte, timeout_idle, timeout_total, status_5xx, protocol, ...)."""

    status = 502
    type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retryable: bool,
        status: int = 502,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        upstream_code: str | None = None,
    ) -> None:
        super().__init__(
            message,
            status=status,
            code=kind,
            param=param,
            should_retry=retryable,
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))} if retryable and retry_after else None,
        )
        self.kind = kind
        self.retryable = retryable
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        self.upstream_code = upstream_code

    def body(self) -> bytes:
        if self.kind == "rejected":
            # The upstream found fault with the request itself (context too long, a bad parameter, an adapter
            # it does not serve): the caller gets OpenAI's client error, with the upstream's param and code.
            code = self.upstream_code or ("model_not_found" if self.status == 404 else None)
            return envelope(self.message, "invalid_request_error", self.param, code)
        return super().body()


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    payload: dict[str, Any] = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return orjson.dumps(payload)
