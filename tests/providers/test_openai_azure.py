"""OpenAI-compatible providers: identity translation, their addresses and credential headers."""

from __future__ import annotations

import orjson
import pytest

from gateway.providers import (
    AnthropicProvider,
    AzureProvider,
    LocalProvider,
    OpenAIProvider,
    Passthrough,
    provider_for,
)

BODY = {"model": "qlp-t3", "messages": [{"role": "user", "content": "hi"}], "guided_json": {"type": "object"}}


def test_provider_for_builds_each_kind() -> None:
    assert isinstance(provider_for("local"), LocalProvider)
    assert isinstance(provider_for("openai"), OpenAIProvider)
    assert isinstance(provider_for("azure", {"deployment": "d"}), AzureProvider)
    assert isinstance(provider_for("anthropic", {"max_tokens_default": 10}), AnthropicProvider)
    with pytest.raises(ValueError):
        provider_for("bedrock")


@pytest.mark.parametrize("kind", ["local", "openai", "azure"])
def test_openai_compatible_bodies_pass_through_with_the_backends_model(kind) -> None:
    p = provider_for(kind, {"deployment": "d"})
    assert not p.translates and isinstance(p.stream_translator(), Passthrough)
    out = orjson.loads(p.request_body(BODY, "gpt-4o", False))
    assert out == {**BODY, "model": "gpt-4o"}
    assert BODY["model"] == "qlp-t3"  # the caller's dict is not changed


@pytest.mark.parametrize("kind", ["local", "openai", "azure"])
def test_streams_always_ask_for_usage_keeping_other_stream_options(kind) -> None:
    p = provider_for(kind, {"deployment": "d"})
    out = orjson.loads(p.request_body({**BODY, "stream": True, "stream_options": {"x": 1}}, "m", True))
    assert out["stream_options"] == {"x": 1, "include_usage": True}


def test_identity_response_reports_usage() -> None:
    raw = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    assert provider_for("openai").response_body(raw) == (
        raw,
        {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    )
    assert provider_for("openai").response_body(b"not json") == (b"not json", None)


def test_credential_headers_per_kind() -> None:
    assert provider_for("openai").headers("k", "r")["Authorization"] == "Bearer k"
    assert "Authorization" not in provider_for("local").headers(None, "r")
    az = provider_for("azure", {"deployment": "d"}).headers("k", "r")
    assert az["api-key"] == "k" and "Authorization" not in az
    an = provider_for("anthropic").headers("k", "r")
    assert an["x-api-key"] == "k" and an["anthropic-version"] == "2023-06-01" and "Authorization" not in an
    for h in (az, an):
        assert h["Content-Type"] == "application/json" and h["X-Request-Id"] == "r"


def test_paths_per_kind_and_endpoint() -> None:
    assert provider_for("openai").path("completions", "m") == "/completions"
    az = provider_for("azure", {"deployment": "d", "api_version": "2025-01-01-preview"})
    assert az.path("completions", "m") == "/openai/deployments/d/completions?api-version=2025-01-01-preview"
    an = provider_for("anthropic")
    assert an.path("chat", "m") == "/messages" and an.endpoints == frozenset({"chat"})
    with pytest.raises(ValueError):
        an.path("completions", "m")
