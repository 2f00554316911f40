"""External providers through the whole gateway: the official openai client -> gateway -> loopback fakes of
Anthropic's Messages API and Azure OpenAI (and tests/fakes/upstream.py for local tiers).

These need gateway/providers wired into config, runtime, the upstream client and the attempt loop
(docs/providers.md, "Wiring"). Until then WIRED is False and the module is skipped; flip it when wired.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

WIRED = True
if not WIRED:
    pytest.skip("gateway/providers is not wired into the request path yet", allow_module_level=True)

from tests.fakes.anthropic import AnthropicScript, FakeAnthropic  # noqa: E402
from tests.fakes.azure import FakeAzure  # noqa: E402
from tests.fakes.gateway import RunningGateway, free_port  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture
def fleet(
    anthropic: FakeAnthropic,
    azure: FakeAzure,
    upstreams: dict[str, FakeUpstream],
    tmp_path: Path,
    gateway_factory: Callable[..., RunningGateway],
) -> Iterator[Callable[..., RunningGateway]]:
    """A gateway whose T3 is the Anthropic fake, T4 the Azure fake, T1 a local fake; T0 falls back to T3."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "anthropic_key").write_text(anthropic.api_key)
    (secrets / "azure_key").write_text(azure.api_key)

    def make(t0_backends: list[dict[str, Any]] | None = None, t3_fallback: list[str] | None = None) -> RunningGateway:
        cfg: dict[str, Any] = {
            "default_tier": "T3",
            "health_interval": 60,
            "retry": {"max_attempts": 3, "backoff_base": 0.001, "backoff_max": 0.01, "max_retry_after": 2},
            "breaker": {"failures": 5, "cooldown": 60},
            "tiers": {
                "T0": {
                    "model": "m0",
                    "aliases": ["qlp-t0"],
                    "fallback": ["T3"],
                    "backends": t0_backends or [{"name": "a", "base_url": upstreams["a"].base_url}],
                },
                "T1": {
                    "model": "m1",
                    "aliases": ["qlp-t1"],
                    "backends": [{"name": "b", "base_url": upstreams["b"].base_url}],
                },
                "T3": {
                    "kind": "anthropic",
                    "model": "claude-sonnet",
                    "aliases": ["qlp-t3"],
                    "max_tokens_default": 512,
                    "fallback": t3_fallback or [],
                    "backends": [{"name": "claude", "base_url": anthropic.base_url, "api_key_secret": "anthropic_key"}],
                },
                "T4": {
                    "kind": "azure",
                    "model": "gpt-4o",
                    "aliases": ["qlp-t4"],
                    "backends": [
                        {
                            "name": "az",
                            "base_url": azure.base_url,
                            "deployment": "gpt4o-prod",
                            "api_version": "2024-10-21",
                            "api_key_secret": "azure_key",
                        }
                    ],
                },
            },
        }
        return gateway_factory(cfg)

    yield make


def client(gw: RunningGateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="k", default_headers=headers, max_retries=0, timeout=20)


def sse_events(raw: bytes) -> list[Any]:
    return ["[DONE]" if e == b"data: [DONE]" else json.loads(e[6:]) for e in raw.split(b"\n\n") if e.strip()]


# -- Anthropic -------------------------------------------------------------------------------------------


def test_anthropic_tier_answers_as_openai(fleet, anthropic) -> None:
    anthropic.push(AnthropicScript(text="Hi!", input_tokens=9, output_tokens=2, cache_read=30))
    r = client(fleet()).chat.completions.with_raw_response.create(model="qlp-t3", messages=MSG)
    c = r.parse()
    assert r.headers["x-qlp-tier"] == "T3" and r.headers["x-qlp-backend"] == "claude/claude-sonnet"
    assert c.choices[0].message.content == "Hi!" and c.choices[0].finish_reason == "stop"
    assert c.usage is not None and c.usage.prompt_tokens == 39 and c.usage.prompt_tokens_details.cached_tokens == 30  # type: ignore[union-attr]
    sent = anthropic.requests[0]
    assert sent["headers"]["x-api-key"] == anthropic.api_key and "Authorization" not in sent["headers"]
    assert sent["body"]["system"] == "Be brief." and sent["body"]["max_tokens"] == 512


def test_anthropic_stream_through_the_openai_client_with_usage(fleet, anthropic) -> None:
    anthropic.push(AnthropicScript(text="Hello there, friend.", split=5, cache_write=8))
    chunks = list(
        client(fleet()).chat.completions.create(
            model="qlp-t3", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there, friend."
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 19


def test_anthropic_stream_hides_usage_unless_asked_and_ends_with_done(fleet) -> None:
    gw = fleet()
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG, "stream": True}
    ) as r:
        events = sse_events(r.read())
    assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])


def test_anthropic_tool_calls_through_the_openai_client(fleet, anthropic) -> None:
    anthropic.push(AnthropicScript(text="", tool=("get_weather", {"city": "Oslo"})))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    c = client(fleet()).chat.completions.create(model="qlp-t3", messages=MSG, tools=tools)  # type: ignore[arg-type]
    call = c.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert c.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]


def test_usage_is_the_same_streamed_and_not(fleet, anthropic) -> None:
    s = AnthropicScript(input_tokens=100, output_tokens=20, cache_read=300, cache_write=40)
    anthropic.push(s, s)
    gw = fleet()
    plain = client(gw).chat.completions.create(model="qlp-t3", messages=MSG).usage
    streamed = list(
        client(gw).chat.completions.create(
            model="qlp-t3", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )[-1].usage
    assert plain == streamed


def test_overloaded_529_is_retried_before_the_first_byte(fleet, anthropic) -> None:
    anthropic.push(AnthropicScript(status=529, error_type="overloaded_error"))
    c = client(fleet()).chat.completions.create(model="qlp-t3", messages=MSG)
    assert c.choices[0].message.content and len(anthropic.requests) == 2


def test_429_with_retry_after_is_retried_and_spend_limit_is_not(fleet, anthropic) -> None:
    gw = fleet()
    anthropic.push(AnthropicScript(status=429, error_type="rate_limit_error", headers={"retry-after": "0.2"}))
    client(gw).chat.completions.create(model="qlp-t3", messages=MSG)
    assert len(anthropic.requests) == 2
    anthropic.requests.clear()
    anthropic.push(
        AnthropicScript(
            status=429,
            error_type="rate_limit_error",
            headers={"retry-after": "0.2"},
            error_details={"error_code": "enforced_spend_limit_reached"},
        )
    )
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "quota_exceeded" and len(anthropic.requests) == 1


@pytest.mark.parametrize(
    ("status", "error_type", "client_status"),
    [(400, "invalid_request_error", 400), (401, "authentication_error", 502), (403, "permission_error", 502)],
)
def test_400_401_403_are_never_retried(fleet, anthropic, status, error_type, client_status) -> None:
    anthropic.push(AnthropicScript(status=status, error_type=error_type, message=f"bad {anthropic.api_key}"))
    r = httpx.post(fleet().url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG})
    assert r.status_code == client_status and len(anthropic.requests) == 1
    assert set(r.json()) == {"error"} and anthropic.api_key not in r.text


def test_error_event_mid_stream_becomes_an_in_band_openai_error(fleet, anthropic) -> None:
    anthropic.push(AnthropicScript(text="one two three four", error_event_after=5))
    with httpx.stream(
        "POST", fleet().url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG, "stream": True}
    ) as r:
        events = sse_events(r.read())
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == "one two "
    assert events[-1]["error"]["code"] == "overloaded" and "[DONE]" not in events


def test_connection_cut_mid_stream_becomes_an_in_band_error(fleet, anthropic) -> None:
    anthropic.push(AnthropicScript(text="one two three four", cut_after=5))
    with httpx.stream(
        "POST", fleet().url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG, "stream": True}
    ) as r:
        events = sse_events(r.read())
    assert "error" in events[-1] and "[DONE]" not in events


def test_completions_endpoint_on_an_anthropic_tier_is_a_400(fleet) -> None:
    r = httpx.post(fleet().url + "/v1/completions", json={"model": "qlp-t3", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint"


# -- hybrid fallback -------------------------------------------------------------------------------------


def test_local_tier_unreachable_falls_back_to_the_external_provider(fleet, anthropic) -> None:
    gw = fleet(t0_backends=[{"name": "dead", "base_url": f"http://127.0.0.1:{free_port()}/v1"}])
    r = client(gw).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    assert r.headers["x-qlp-tier"] == "T3" and r.headers["x-qlp-backend"] == "claude/claude-sonnet"
    assert anthropic.requests[0]["body"]["model"] == "claude-sonnet"


def test_overloaded_before_any_content_falls_back(fleet, anthropic, upstreams) -> None:
    anthropic.push(AnthropicScript(error_event_after=2))  # message_start, ping, then overloaded_error
    gw = fleet(t3_fallback=["T1"])
    with client(gw).chat.completions.with_streaming_response.create(model="qlp-t3", messages=MSG, stream=True) as r:
        assert r.headers["x-qlp-tier"] == "T1"


# -- Azure -----------------------------------------------------------------------------------------------


def test_azure_tier_through_the_openai_client(fleet, azure) -> None:
    gw = fleet()
    c = client(gw).chat.completions.create(model="qlp-t4", messages=MSG)
    chunks = list(client(gw).chat.completions.create(model="qlp-t4", messages=MSG, stream=True))
    assert (
        c.choices[0].message.content == "hello"
        and "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "hello0 hello1 hello2 "
    )
    sent = azure.requests[0]
    assert (
        sent["path"] == "/openai/deployments/gpt4o-prod/chat/completions"
        and sent["query"]["api-version"] == "2024-10-21"
    )
    assert sent["headers"]["api-key"] == azure.api_key and "Authorization" not in sent["headers"]


# -- SSRF ------------------------------------------------------------------------------------------------


def test_nothing_in_a_request_moves_the_gateways_connection_or_credentials(fleet, anthropic, azure) -> None:
    evil = FakeUpstream("evil").start()
    try:
        gw = fleet()
        tricks = {
            "api_base": evil.base_url,
            "base_url": evil.base_url,
            "api_key": "sk-attacker",
            "api_version": "1999-01-01",
            "azure_endpoint": evil.base_url,
            "deployment_id": "evil",
            "extra_headers": {"Host": f"127.0.0.1:{evil.port}"},
        }
        headers = {
            "Host": f"127.0.0.1:{evil.port}",
            "X-Forwarded-Host": f"127.0.0.1:{evil.port}",
            "X-Api-Key": "sk-attacker",
            "Anthropic-Version": "1999-01-01",
        }
        for model in ("qlp-t3", "qlp-t4"):
            client(gw, **headers).chat.completions.create(model=model, messages=MSG, extra_body=tricks)
        for model in (f"qlp-t3#@127.0.0.1:{evil.port}", f"{evil.base_url}/chat/completions"):
            httpx.post(gw.url + "/v1/chat/completions", json={"model": model, "messages": MSG, **tricks})
        assert not evil.requests
        assert all(r["headers"]["x-api-key"] == anthropic.api_key for r in anthropic.requests)
        assert all(r["headers"]["anthropic-version"] == "2023-06-01" for r in anthropic.requests)
        assert all(r["headers"]["api-key"] == azure.api_key for r in azure.requests)
        assert all(r["path"] == "/openai/deployments/gpt4o-prod/chat/completions" for r in azure.requests)
        assert not any(k in r["body"] for r in [*anthropic.requests, *azure.requests] for k in tricks)
    finally:
        evil.stop()
