"""Provider error answers -> retry rules and the caller's status (the table in gateway/providers/errors.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest

from gateway.providers import provider_for
from gateway.providers.errors import anthropic_event_error, retry_after
from gateway.upstream.client import sanitize


def openai_err(code: str | None = None, message: str = "m", type_: str = "x") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}})


def anthropic_err(type_: str, message: str = "m", details: dict[str, Any] | None = None) -> bytes:
    err: dict[str, Any] = {"type": type_, "message": message}
    if details:
        err["details"] = details
    return orjson.dumps({"type": "error", "error": err, "request_id": "req_1"})


RA = {"retry-after": "2"}

# (kind, status, headers, body) -> (error kind, retryable, caller status, retry_after)
TABLE = [
    ("openai", 429, RA, openai_err("rate_limit_exceeded"), ("status_429", True, 429, 2.0)),
    ("openai", 429, {}, openai_err("rate_limit_exceeded"), ("status_429", False, 429, None)),
    (
        "openai",
        429,
        RA,
        openai_err("insufficient_quota", type_="insufficient_quota"),
        ("quota_exceeded", False, 503, None),
    ),
    ("openai", 400, {}, openai_err("invalid_value"), ("rejected", False, 400, None)),
    ("openai", 401, {}, openai_err("invalid_api_key"), ("upstream_auth", False, 502, None)),
    ("openai", 403, {}, openai_err(), ("upstream_auth", False, 502, None)),
    ("openai", 404, {}, openai_err("model_not_found"), ("rejected", False, 404, None)),
    ("openai", 500, {}, openai_err(), ("status_5xx", False, 502, None)),
    ("openai", 503, RA, openai_err(), ("status_5xx", True, 503, 2.0)),
    ("azure", 429, {"retry-after-ms": "1500", "retry-after": "2"}, openai_err("429"), ("status_429", True, 429, 1.5)),
    ("azure", 400, {}, openai_err("content_filter"), ("rejected", False, 400, None)),
    ("azure", 401, {}, openai_err("401"), ("upstream_auth", False, 502, None)),
    ("local", 429, RA, openai_err(), ("status_429", True, 429, 2.0)),
    ("anthropic", 529, {}, anthropic_err("overloaded_error"), ("overloaded", True, 503, None)),
    ("anthropic", 529, RA, anthropic_err("overloaded_error"), ("overloaded", True, 503, 2.0)),
    ("anthropic", 429, RA, anthropic_err("rate_limit_error"), ("status_429", True, 429, 2.0)),
    ("anthropic", 429, {}, anthropic_err("rate_limit_error"), ("status_429", False, 429, None)),
    (
        "anthropic",
        429,
        RA,
        anthropic_err("rate_limit_error", details={"error_code": "enforced_spend_limit_reached"}),
        ("quota_exceeded", False, 503, None),
    ),
    ("anthropic", 402, {}, anthropic_err("billing_error"), ("quota_exceeded", False, 503, None)),
    (
        "anthropic",
        400,
        {},
        anthropic_err("invalid_request_error", "Your credit balance is too low to access the API"),
        ("quota_exceeded", False, 503, None),
    ),
    (
        "anthropic",
        400,
        {},
        anthropic_err("invalid_request_error", "messages: roles must alternate"),
        ("rejected", False, 400, None),
    ),
    ("anthropic", 401, {}, anthropic_err("authentication_error"), ("upstream_auth", False, 502, None)),
    ("anthropic", 403, {}, anthropic_err("permission_error"), ("upstream_auth", False, 502, None)),
    ("anthropic", 413, {}, anthropic_err("request_too_large"), ("rejected", False, 413, None)),
    ("anthropic", 500, {}, anthropic_err("api_error"), ("status_5xx", False, 502, None)),
]


@pytest.mark.parametrize(("kind", "status", "headers", "body", "expected"), TABLE)
def test_error_classification_table(kind, status, headers, body, expected) -> None:
    c = provider_for(kind, {"deployment": "d"}).classify_error(status, headers, body)
    assert (c.kind, c.retryable, c.status, c.retry_after) == expected
    assert c.upstream_status == status


@pytest.mark.parametrize("status", [400, 401, 403])
@pytest.mark.parametrize("kind", ["openai", "azure", "anthropic"])
def test_400_401_403_are_never_retried(kind, status) -> None:
    body = anthropic_err("invalid_request_error") if kind == "anthropic" else openai_err()
    assert not provider_for(kind, {"deployment": "d"}).classify_error(status, RA, body).retryable


def test_the_callers_message_for_a_rejected_request_is_the_providers() -> None:
    c = provider_for("anthropic").classify_error(400, {}, anthropic_err("invalid_request_error", "max_tokens: too big"))
    assert c.message == "max_tokens: too big"
    assert (c.param, c.code) == (None, None)  # Anthropic's error fields are never taken for OpenAI's


def test_a_rejected_request_reaches_the_caller_as_openais_client_error() -> None:
    """vLLM's 400 names the field; its `code` is the HTTP status as an int, which is no error code."""
    body = orjson.dumps(
        {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    )
    err = provider_for("openai").classify_error(400, {}, body).to_error(lambda m: m)
    assert (err.status, err.kind) == (400, "rejected")
    assert orjson.loads(err.body())["error"] == {
        "message": "max_tokens is too large",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": None,
    }
    missing = provider_for("openai").classify_error(404, {}, orjson.dumps({"error": {"message": "no", "code": 404}}))
    assert orjson.loads(missing.to_error(lambda m: m).body())["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set', "tool_choice"),
        ("This model does not support tools", "tools"),
        ("Invalid json_schema: unknown type", "response_format"),
        ("prompt is too long", None),
    ],
)
def test_a_rejection_without_param_names_the_field_its_message_is_about(message: str, param: str | None) -> None:
    """vLLM's 400 for `tool_choice: auto` without a tool parser has `param: null` (seen from vLLM 0.32)."""
    body = orjson.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})
    err = provider_for("openai").classify_error(400, {}, body).to_error(lambda m: m)
    assert orjson.loads(err.body())["error"]["param"] == param


def test_quota_and_auth_messages_do_not_repeat_the_providers_text() -> None:
    p = provider_for("openai")
    quota = p.classify_error(429, {}, openai_err("insufficient_quota", "org-SECRET has exceeded its quota"))
    auth = p.classify_error(401, {}, openai_err(message="Incorrect API key provided: sk-abc...xyz"))
    assert "org-SECRET" not in quota.message and "sk-" not in auth.message


def test_to_error_redacts_the_gateways_secrets_and_keylike_strings() -> None:
    key = "upstream-secret-123456"
    c = provider_for("openai").classify_error(400, {}, openai_err(message=f"bad key {key} and sk-abcdefghijkl"))
    err = c.to_error(lambda m: sanitize(m, (key,)))
    assert key not in err.message and "sk-abcdefghijkl" not in err.message
    assert (err.kind, err.status, err.retryable, err.upstream_status) == ("rejected", 400, False, 400)


def test_retry_after_reads_ms_seconds_and_http_dates() -> None:
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "-3"}) == 0.0
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after({"retry-after": when}) <= 30  # type: ignore[operator]
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


@pytest.mark.parametrize(
    ("type_", "kind", "retryable"),
    [
        ("overloaded_error", "overloaded", True),
        ("api_error", "status_5xx", False),
        ("rate_limit_error", "status_429", False),
        ("invalid_request_error", "rejected", False),
        ("something_new", "status_5xx", False),
    ],
)
def test_stream_error_events_are_classified_like_their_status(type_, kind, retryable) -> None:
    c = anthropic_event_error({"type": type_, "message": "x"})
    assert (c.kind, c.retryable) == (kind, retryable)


def test_garbage_error_bodies_still_classify() -> None:
    for body in (b"", b"<html>502</html>", b"[1]", b'{"error": "plain string"}'):
        assert provider_for("anthropic").classify_error(502, {}, body).kind == "status_5xx"
        assert provider_for("openai").classify_error(400, {}, body).kind == "rejected"
