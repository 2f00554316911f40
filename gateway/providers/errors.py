"""Provider error answers mapped to retry rules and to the status the caller sees.

    upstream answer                                  kind            retry?                 caller
    429 rate limit with Retry-After(-ms)             status_429      yes, after that long   429
    429 rate limit without it                        status_429      no (falls back)        429
    429 insufficient_quota / spend limit, 402        quota_exceeded  never (falls back)     503
    529 / overloaded_error (Anthropic)               overloaded      yes                    503
    401, 403 (the gateway's own credentials)         upstream_auth   never (falls back)     502
    other 4xx (the request itself)                   rejected        never, no fallback     same status
    502, 503, 504                                    status_5xx      yes                    same status
    other 5xx                                        status_5xx      no (falls back)        502

The quota and auth cases are the operator's problem, not the caller's: their message says so without
repeating the provider's text (which can name the account). `rejected` keeps the provider's message,
param and code (the caller needs them to fix the request); `ErrorClass.to_error` redacts secrets from every message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from gateway.providers.base import ErrorClass

__all__ = ["anthropic_event_error", "classify_anthropic", "classify_openai", "error_object", "retry_after"]

# Anthropic's error types and the HTTP status each comes with (its public errors reference).
ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "enforced_spend_limit_reached"})
# Anthropic answers a workspace spend limit or an empty credit balance with a plain 400: only its text tells.
_ANTHROPIC_QUOTA_TEXT = re.compile(r"credit balance|spend(ing)? limit|usage limit", re.IGNORECASE)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI, Azure) or `retry-after` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
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


def error_object(body: bytes) -> dict[str, Any]:
    """The `error` object of an OpenAI or Anthropic error body ({} when there is none)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(obj, dict):
        return {}
    err = obj.get("error")
    if isinstance(err, dict):
        return err
    if isinstance(err, str):
        return {"message": err}
    return {"message": obj["message"]} if isinstance(obj.get("message"), str) else {}


def _message(err: Mapping[str, Any]) -> str:
    m = err.get("message")
    return m if isinstance(m, str) else ""


def _codes(err: Mapping[str, Any]) -> set[str]:
    details = err.get("details")
    values = [err.get("code"), err.get("type"), details.get("error_code") if isinstance(details, dict) else None]
    return {v for v in values if isinstance(v, str)}


# A rejection that names no `param` (vLLM's answer to `tool_choice: auto` on a server started without a tool
# parser, for one) still says which field it is about: the caller's SDK shows `param`, so name it.
_PARAM_IN_MESSAGE = (
    (re.compile(r"\btool[ _]choice\b", re.IGNORECASE), "tool_choice"),
    (re.compile(r"\b(?:tools?|tool[ _]call(?:ing|s)?)\b", re.IGNORECASE), "tools"),
    (re.compile(r"\bresponse_format\b|\bjson[ _]schema\b", re.IGNORECASE), "response_format"),
)


def _param(err: Mapping[str, Any], detail: str) -> str | None:
    param = err.get("param")
    if isinstance(param, str):
        return param
    return next((name for pattern, name in _PARAM_IN_MESSAGE if pattern.search(detail)), None)


def _common(status: int, headers: Mapping[str, str], err: Mapping[str, Any]) -> ErrorClass:
    detail = _message(err)
    if status == 429:
        ra = retry_after(headers)
        return ErrorClass(
            "status_429", ra is not None, 429, "upstream rate limit" + (f": {detail}" if detail else ""), status, ra
        )
    if status in (401, 403):
        # The caller's key was fine (the gateway checked it); the gateway's own credentials were refused.
        return ErrorClass("upstream_auth", False, 502, "upstream refused the gateway's credentials", status)
    if 400 <= status < 500:
        code = err.get("code")  # vLLM sends its status as an int `code`: not a code
        return ErrorClass(
            "rejected",
            False,
            status,
            detail or f"upstream rejected the request ({status})",
            status,
            param=_param(err, detail),
            code=code if isinstance(code, str) else None,
        )
    if status in (502, 503, 504):
        return ErrorClass("status_5xx", True, status, f"upstream unavailable ({status})", status, retry_after(headers))
    return ErrorClass("status_5xx", False, 502, f"upstream failed ({status})", status)


def _quota(status: int) -> ErrorClass:
    return ErrorClass(
        "quota_exceeded",
        False,
        503,
        "the upstream provider refused: the gateway's account is out of quota or over its spend limit",
        status,
    )


def classify_openai(status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass:
    """OpenAI, Azure OpenAI and every OpenAI-compatible server (vLLM, the CPU model server)."""
    err = error_object(body)
    if (status == 429 and _codes(err) & _QUOTA_CODES) or status == 402:
        return _quota(status)
    return _common(status, headers, err)


def classify_anthropic(status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass:
    err = error_object(body)
    kind = err.get("type")
    if status == 529 or kind == "overloaded_error":
        return ErrorClass("overloaded", True, 503, "upstream overloaded", status, retry_after(headers))
    if status == 402 or kind == "billing_error" or (status == 429 and _codes(err) & _QUOTA_CODES):
        return _quota(status)
    if status == 400 and _ANTHROPIC_QUOTA_TEXT.search(_message(err)):
        return _quota(status)
    c = _common(status, headers, err)
    # Anthropic's error body is not OpenAI's: never hand it to anything that might pass it through.
    return ErrorClass(c.kind, c.retryable, c.status, c.message, c.upstream_status, c.retry_after)


def anthropic_event_error(err: Any) -> ErrorClass:
    """The `error` event of an Anthropic stream (it came after a 200): classified as its status would be."""
    err = err if isinstance(err, dict) else {}
    status = ANTHROPIC_STATUS.get(str(err.get("type")), 500)
    return classify_anthropic(status, {}, orjson.dumps({"type": "error", "error": err}))
