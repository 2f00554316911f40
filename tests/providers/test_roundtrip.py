"""Providers over real HTTP: translated requests sent to loopback fakes of each API, answers translated back.

`exchange()` does what the gateway's upstream client does with a provider (URL from the configured base
and `path`, `headers`, `request_body`; then `classify_error`, `response_body` or the stream translator),
with httpx as the transport. The fakes validate requests the way the real APIs do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.providers import ErrorClass, Provider, ProviderError, provider_for
from tests.fakes.anthropic import AnthropicScript, FakeAnthropic
from tests.fakes.azure import FakeAzure
from tests.fakes.upstream import Script

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@dataclass
class Result:
    status: int = 0
    body: bytes = b""  # translated (OpenAI) bytes
    usage: dict[str, Any] | None = None
    error: ErrorClass | None = None
    broke: bool = False  # the connection broke mid-stream
    events: list[Any] = field(default_factory=list)


def exchange(p: Provider, base_url: str, key: str, body: dict[str, Any], stream: bool = False) -> Result:
    r = Result()
    with (
        httpx.Client(timeout=10) as c,
        c.stream(
            "POST",
            base_url + p.path("chat", "cfg-model"),
            headers=p.headers(key, "rid-1"),
            content=p.request_body(body, "cfg-model", stream),
        ) as resp,
    ):
        r.status = resp.status_code
        if resp.status_code >= 300:
            r.error = p.classify_error(resp.status_code, dict(resp.headers), resp.read())
            return r
        if not stream:
            r.body, r.usage = p.response_body(resp.read())
            return r
        tr = p.stream_translator()
        out: list[bytes] = []
        try:
            for chunk in resp.iter_raw():
                out.append(tr.feed(chunk))
        except ProviderError as exc:
            out.append(exc.pending)
            r.error = exc.error
        except httpx.HTTPError:
            r.broke = True
        r.body = b"".join(out)
    for e in r.body.split(b"\n\n"):
        if e:
            r.events.append("[DONE]" if e == b"data: [DONE]" else json.loads(e[6:]))
    usage = [e for e in r.events if isinstance(e, dict) and e.get("usage")]
    r.usage = usage[-1]["usage"] if usage else None
    return r


def text_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e.get("choices")
    )


# -- Anthropic -------------------------------------------------------------------------------------------


def ap(**opts: Any) -> Provider:
    return provider_for("anthropic", opts)


def test_anthropic_non_stream_round_trip(anthropic: FakeAnthropic) -> None:
    anthropic.push(AnthropicScript(text="Hi!", cache_read=50, cache_write=5))
    r = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG, "temperature": 1.8, "stop": "END"})
    c = ChatCompletion.model_validate_json(r.body)
    assert c.choices[0].message.content == "Hi!" and r.usage is not None and r.usage["prompt_tokens"] == 66
    sent = anthropic.requests[0]
    assert sent["path"] == "/v1/messages" and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["system"] == "Be brief." and sent["body"]["temperature"] == 1.0
    assert sent["body"]["stop_sequences"] == ["END"] and sent["body"]["model"] == "cfg-model"


def test_anthropic_stream_split_into_tiny_writes_round_trip(anthropic: FakeAnthropic) -> None:
    anthropic.push(AnthropicScript(text="Hello there, friend.", split=3))
    r = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG}, stream=True)
    assert r.events[-1] == "[DONE]" and text_of(r.events) == "Hello there, friend."
    for e in r.events[:-1]:
        ChatCompletionChunk.model_validate(e)


def test_anthropic_tool_conversation_round_trip(anthropic: FakeAnthropic) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    anthropic.push(AnthropicScript(text="", tool=("get_weather", {"city": "Oslo"})))
    first = exchange(
        ap(),
        anthropic.base_url,
        anthropic.api_key,
        {"messages": MSG, "tools": tools, "tool_choice": "required"},
        stream=True,
    )
    calls = [tc for e in first.events[:-1] if e["choices"] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    call_id, args = calls[0]["id"], "".join(tc["function"].get("arguments", "") for tc in calls)
    assert json.loads(args) == {"city": "Oslo"}
    # The caller answers the tool call; the fake checks the tool_result refers to the tool_use.
    follow = [
        *MSG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": args}}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "5C"},
    ]
    r = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": follow, "tools": tools})
    assert r.status == 200 and anthropic.requests[1]["body"]["messages"][2]["content"][0]["type"] == "tool_result"


def test_anthropic_usage_is_identical_streamed_and_not(anthropic: FakeAnthropic) -> None:
    s = AnthropicScript(input_tokens=123, output_tokens=45, cache_read=600, cache_write=70)
    anthropic.push(s, s)
    plain = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG})
    streamed = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG}, stream=True)
    assert plain.usage == streamed.usage and plain.usage is not None and plain.usage["total_tokens"] == 838


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (AnthropicScript(status=529, error_type="overloaded_error"), ("overloaded", True, 503)),
        (
            AnthropicScript(status=429, error_type="rate_limit_error", headers={"retry-after": "1"}),
            ("status_429", True, 429),
        ),
        (
            AnthropicScript(
                status=429,
                error_type="rate_limit_error",
                headers={"retry-after": "60"},
                error_details={"error_code": "enforced_spend_limit_reached"},
            ),
            ("quota_exceeded", False, 503),
        ),
        (AnthropicScript(status=400, error_type="invalid_request_error"), ("rejected", False, 400)),
    ],
)
def test_anthropic_error_answers_are_classified(anthropic: FakeAnthropic, script, expected) -> None:
    anthropic.push(script)
    r = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG})
    assert r.error is not None and (r.error.kind, r.error.retryable, r.error.status) == expected


def test_anthropic_refuses_a_wrong_key_as_the_gateways_credential_problem(anthropic: FakeAnthropic) -> None:
    r = exchange(ap(), anthropic.base_url, "sk-ant-wrong", {"messages": MSG})
    assert r.status == 401 and r.error is not None and (r.error.kind, r.error.status) == ("upstream_auth", 502)


def test_anthropic_error_event_mid_stream_is_reported_after_the_text_before_it(anthropic: FakeAnthropic) -> None:
    anthropic.push(AnthropicScript(text="one two three four", error_event_after=5))
    r = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG}, stream=True)
    assert r.error is not None and r.error.kind == "overloaded"
    assert text_of(r.events) == "one two " and "[DONE]" not in r.events


def test_anthropic_connection_cut_mid_stream_leaves_no_done(anthropic: FakeAnthropic) -> None:
    anthropic.push(AnthropicScript(text="one two three four", cut_after=5))
    r = exchange(ap(), anthropic.base_url, anthropic.api_key, {"messages": MSG}, stream=True)
    assert text_of(r.events) == "one two " and "[DONE]" not in r.events and r.usage is None


def test_anthropic_long_conversation_is_valid_for_the_api(anthropic: FakeAnthropic) -> None:
    messages = [
        {"role": "system", "content": "s1"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "developer", "content": "s2"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "d"}]},
    ]
    r = exchange(
        ap(),
        anthropic.base_url,
        anthropic.api_key,
        {"messages": messages, "seed": 7, "frequency_penalty": 0.5, "response_format": {"type": "text"}},
    )
    assert r.status == 200, anthropic.requests[-1]
    assert anthropic.requests[0]["body"]["system"] == "s1\n\ns2"


# -- Azure -----------------------------------------------------------------------------------------------


def az(**opts: Any) -> Provider:
    return provider_for("azure", {"deployment": "gpt4o-prod", **opts})


def test_azure_round_trip_uses_deployment_url_version_and_api_key(azure: FakeAzure) -> None:
    r = exchange(az(), azure.base_url, azure.api_key, {"model": "whatever", "messages": MSG})
    assert r.status == 200 and ChatCompletion.model_validate_json(r.body).choices[0].message.content == "hello"
    sent = azure.requests[0]
    assert sent["path"] == "/openai/deployments/gpt4o-prod/chat/completions"
    assert sent["query"] == {"api-version": "2024-10-21"} and "Authorization" not in sent["headers"]


def test_azure_stream_round_trip_has_usage_and_done(azure: FakeAzure) -> None:
    r = exchange(az(), azure.base_url, azure.api_key, {"messages": MSG, "stream": True}, stream=True)
    assert r.events[-1] == "[DONE]" and r.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert text_of(r.events) == "hello0 hello1 hello2 "


@pytest.mark.parametrize(
    ("provider_opts", "key", "status", "kind"),
    [
        ({}, "wrong-key", 401, "upstream_auth"),
        ({"deployment": "not-deployed"}, None, 404, "rejected"),
        ({"api_version": "2023-01-01"}, None, 404, "rejected"),
    ],
)
def test_azure_misconfiguration_is_classified(azure: FakeAzure, provider_opts, key, status, kind) -> None:
    r = exchange(az(**provider_opts), azure.base_url, key or azure.api_key, {"messages": MSG})
    assert r.status == status and r.error is not None and r.error.kind == kind


def test_azure_429_honours_retry_after_ms(azure: FakeAzure) -> None:
    azure.push(
        Script(
            status=429,
            headers={"retry-after-ms": "800", "retry-after": "1"},
            body=orjson.dumps({"error": {"code": "429", "message": "Rate limit is exceeded."}}),
        )
    )
    r = exchange(az(), azure.base_url, azure.api_key, {"messages": MSG})
    assert r.error is not None and (r.error.kind, r.error.retryable, r.error.retry_after) == ("status_429", True, 0.8)
