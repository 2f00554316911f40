"""Request bodies: parsed once (orjson), validated where it matters, passed through otherwise.

We check what the gateway itself relies on (messages, roles, `n`, `max_tokens`, `stream`) and the sampling
fields whose ranges OpenAI documents (temperature, top_p, penalties, logprobs, seed, stop, logit_bias), so a
bad value gets OpenAI's 400 naming the field before any upstream is called, whichever upstream serves the
tier. Everything else, known to OpenAI or not, goes to the upstream unchanged so new API fields work
without a gateway release.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.errors import InvalidRequest

__all__ = ["Endpoint", "ParsedRequest", "parse_request"]

log = logging.getLogger("qlp.gateway")

Endpoint = Literal["chat", "completions"]

MAX_TOKEN_ID = 2**32 - 1  # token ids index a vocabulary
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Fields some gateways read to choose where to connect or which key to send. We never honour them; we drop
# them so they cannot reach an upstream either.
ROUTING_FIELDS = ("api_base", "base_url", "api_key", "api_version", "custom_llm_provider", "organization")


@dataclass(slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str | None
    stream: bool
    n: int
    max_tokens: int | None
    client_wants_usage: bool


def _int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        # JSON has one number type: 7.0 is the integer 7 (as JSON Schema says); the upstream gets 7.
        # orjson gives a float for an integer beyond 64 bits, rounded: -2**63 - 1 reads as -2.0**63, so a
        # float at the edge of the int64 range is outside it.
        if not -(2.0**63) < v < 2.0**63:
            raise InvalidRequest(f"'{name}' must be between {lo} and {hi}", param=name, code="invalid_value")
        v = body[name] = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"'{name}' must be an integer", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}, got {v}", param=name, code="invalid_value")
    return v


# OpenAI's documented ranges (the API reference of chat and legacy completions); routes/proxy_doc.py
# describes the same ones.
NUMBER_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
INT64 = (-(2**63), 2**63 - 1)
TOP_LOGPROBS = (0, 20)  # chat's top_logprobs
COMPLETION_LOGPROBS = (0, 5)  # legacy completions' logprobs


def _number_field(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidRequest(f"'{name}' must be a number", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise InvalidRequest(
            f"'{name}' must be between {lo:g} and {hi:g}, got {v}"[:200], param=name, code="invalid_value"
        )


def _check_sampling(body: dict[str, Any], endpoint: Endpoint) -> None:
    for name, (lo, hi) in NUMBER_RANGES.items():
        _number_field(body, name, lo, hi)
    _int_field(body, "seed", *INT64)
    if endpoint == "chat":
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise InvalidRequest("'logprobs' must be a boolean", param="logprobs", code="invalid_type")
        _int_field(body, "top_logprobs", *TOP_LOGPROBS)
    else:
        _int_field(body, "logprobs", *COMPLETION_LOGPROBS)
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest(
                "'logit_bias' must be an object of token id to bias", param="logit_bias", code="invalid_type"
            )
        for k, v in bias.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                raise InvalidRequest(
                    f"logit_bias[{k[:20]!r}] must be a number between -100 and 100",
                    param="logit_bias",
                    code="invalid_value",
                )
    for name in ("tools", "functions"):
        v = body.get(name)
        if v is not None and not (isinstance(v, list) and all(isinstance(t, dict) for t in v)):
            raise InvalidRequest(f"'{name}' must be an array of objects", param=name, code="invalid_type")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # an object or array is unhashable: no set lookup
            raise InvalidRequest(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}"[:300],
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or an array of parts",
                param=f"messages[{i}].content",
                code="invalid_type",
            )
        if content is None and role not in ("assistant", "function"):
            raise InvalidRequest(
                f"messages[{i}].content is required for role {role!r}",
                param=f"messages[{i}].content",
                code="invalid_value",
            )


def _token_id(p: Any) -> int | None:
    if isinstance(p, float) and p.is_integer():
        p = int(p)  # 5.0 is the token id 5 in JSON (see _int_field)
    return p if isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= MAX_TOKEN_ID else None


def _check_prompt(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    ok = isinstance(prompt, str) and prompt != ""
    if isinstance(prompt, list) and prompt:
        items = [p if isinstance(p, str) else _token_id(p) for p in prompt]
        ok = None not in items
        if ok and any(isinstance(p, float) for p in prompt):
            body["prompt"] = items  # the upstream gets 5, not 5.0
    if not ok:
        raise InvalidRequest(
            "'prompt' must be a non-empty string or array of strings or token ids", param="prompt", code="invalid_value"
        )


def parse_request(raw: bytes, endpoint: Endpoint, *, max_n: int, max_tokens_limit: int) -> ParsedRequest:
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message names line and column but never echoes the input: safe to show.
        raise InvalidRequest(f"request body is not valid JSON: {exc}"[:300], code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options", code="invalid_type")
    if endpoint == "chat":
        _check_messages(body.get("messages"))
    else:
        _check_prompt(body)
    _check_sampling(body, endpoint)
    n = _int_field(body, "n", 1, max_n) or 1
    max_tokens = _int_field(body, "max_tokens", 1, max_tokens_limit)
    mct = _int_field(body, "max_completion_tokens", 1, max_tokens_limit)
    if max_tokens is None:
        max_tokens = mct

    dropped = [f for f in ROUTING_FIELDS if f in body]
    for f in dropped:
        del body[f]
    if dropped:
        log.info("dropped request fields that may not steer upstreams: %s", ",".join(dropped))
    return ParsedRequest(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream,
        n=n,
        max_tokens=max_tokens,
        client_wants_usage=bool(stream and opts and opts.get("include_usage")),
    )
