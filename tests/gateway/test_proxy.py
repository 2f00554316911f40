"""The proxy over real HTTP: the official openai client -> gateway -> scriptable loopback upstreams."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.gateway import free_port
from tests.fakes.upstream import FakeUpstream, Script

MSG = [{"role": "user", "content": "hi"}]


def fleet(ups: dict[str, FakeUpstream], **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "default_tier": "T0",
        "health_interval": 60,
        "retry": {"max_attempts": 3, "backoff_base": 0.001, "backoff_max": 0.01},
        "breaker": {"failures": 3, "cooldown": 60},
        "tiers": {
            "T0": {
                "model": "m0",
                "aliases": ["qlp-t0"],
                "adapters": ["dev-v1"],
                "agents": {"developer": "dev-v1"},
                "fallback": ["T1"],
                "backends": [{"name": "a", "base_url": ups["a"].base_url}],
            },
            "T1": {"model": "m1", "aliases": ["qlp-t1"], "backends": [{"name": "b", "base_url": ups["b"].base_url}]},
        },
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def client(gw: Any, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="k", default_headers=headers, max_retries=0, timeout=20)


# -- happy paths ------------------------------------------------------------------------------------------


def test_non_stream_response_is_the_upstreams_with_routing_headers(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    r = client(gw).chat.completions.with_raw_response.create(
        model="qlp-t0", messages=MSG, extra_headers={"X-Request-Id": "req-123"}
    )
    assert r.headers["x-request-id"] == "req-123"
    assert r.headers["x-qlp-tier"] == "T0" and r.headers["x-qlp-backend"] == "a/m0"
    assert r.parse().choices[0].message.content == "hello"
    assert upstreams["a"].requests[0]["body"]["model"] == "m0"  # rewritten to the backend's model


def test_request_id_is_generated_when_absent(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t0", "messages": MSG})
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32


def test_tier_header_routes_to_that_tier(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    r = client(gw, **{"X-QLP-Tier": "T1"}).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    assert r.headers["x-qlp-tier"] == "T1" and upstreams["b"].requests[0]["body"]["model"] == "m1"


def test_agent_header_sends_the_agents_adapter_upstream(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    r = client(gw, **{"X-QLP-Agent": "developer"}).chat.completions.with_raw_response.create(
        model="qlp-t0", messages=MSG
    )
    assert r.headers["x-qlp-backend"] == "a/dev-v1" and upstreams["a"].requests[0]["body"]["model"] == "dev-v1"


def test_unknown_request_fields_pass_through_and_steering_fields_do_not(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    client(gw).chat.completions.create(
        model="qlp-t0",
        messages=MSG,
        extra_body={"guided_json": {"type": "object"}, "api_base": "http://evil", "base_url": "http://evil"},
    )
    body = upstreams["a"].requests[0]["body"]
    assert body["guided_json"] == {"type": "object"} and "api_base" not in body and "base_url" not in body


def test_completions_endpoint_is_proxied(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    client(gw).completions.create(model="qlp-t1", prompt="def f():")
    assert upstreams["b"].requests[0]["path"] == "/v1/completions"


def test_stream_passes_every_chunk_and_ends_with_done(upstreams, gateway_factory) -> None:
    upstreams["a"].default = Script(n_chunks=5)
    gw = gateway_factory(fleet(upstreams))
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "qlp-t0", "messages": MSG, "stream": True}
    ) as r:
        raw = r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    texts = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert texts == ["", "hello0 ", "hello1 ", "hello2 ", "hello3 ", "hello4 ", None]


def test_stream_hides_usage_chunk_unless_client_asked(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    chunks = list(client(gw).chat.completions.create(model="qlp-t0", messages=MSG, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert upstreams["a"].requests[0]["body"]["stream_options"] == {"include_usage": True}


def test_stream_keeps_usage_chunk_when_client_asked(upstreams, gateway_factory) -> None:
    gw = gateway_factory(fleet(upstreams))
    chunks = list(
        client(gw).chat.completions.create(
            model="qlp-t0", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


# -- fallback, retries, breaker ----------------------------------------------------------------------------


def test_fallback_when_tier_has_no_reachable_backend(upstreams, gateway_factory) -> None:
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"]["backends"] = [{"name": "dead", "base_url": f"http://127.0.0.1:{free_port()}/v1"}]
    gw = gateway_factory(cfg)
    r = client(gw).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    assert r.headers["x-qlp-tier"] == "T1" and r.headers["x-qlp-backend"] == "b/m1"


def test_fallback_when_backend_fails_before_first_byte(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(status=500))
    gw = gateway_factory(fleet(upstreams))
    r = client(gw).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    assert r.headers["x-qlp-tier"] == "T1" and len(upstreams["a"].requests) == 1


def test_stream_falls_back_when_first_chunk_never_comes(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(first_chunk_delay=3))
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"]["timeouts"] = {"first_byte": 0.3}
    gw = gateway_factory(cfg)
    with client(gw).chat.completions.with_streaming_response.create(model="qlp-t0", messages=MSG, stream=True) as r:
        assert r.headers["x-qlp-tier"] == "T1"


def no_fallback(ups: dict[str, FakeUpstream], **over: Any) -> dict[str, Any]:
    cfg = fleet(ups, **over)
    cfg["tiers"]["T0"]["fallback"] = []
    return cfg


def test_503_is_retried_on_another_backend_of_the_tier_first(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(status=503))
    upstreams["c"].push(Script(status=503))
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"]["backends"].append({"name": "c", "base_url": upstreams["c"].base_url})
    gw = gateway_factory(cfg)
    r = client(gw).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    # a and c each failed once (the order is random); then T0 was exhausted and T1 served.
    assert len(upstreams["a"].requests) == 1 and len(upstreams["c"].requests) == 1
    assert r.headers["x-qlp-tier"] == "T1"


def test_503_is_retried_on_the_same_backend_when_nothing_else_is_left(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(status=503))
    gw = gateway_factory(no_fallback(upstreams))
    r = client(gw).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    assert r.headers["x-qlp-tier"] == "T0" and len(upstreams["a"].requests) == 2


def test_429_with_retry_after_is_honoured(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(status=429, headers={"Retry-After": "0.3"}))
    gw = gateway_factory(no_fallback(upstreams))
    t0 = time.monotonic()
    r = client(gw).chat.completions.with_raw_response.create(model="qlp-t0", messages=MSG)
    assert r.headers["x-qlp-tier"] == "T0" and time.monotonic() - t0 >= 0.3
    assert len(upstreams["a"].requests) == 2


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_are_never_retried_nor_fall_back(upstreams, gateway_factory, status) -> None:
    upstreams["a"].push(
        Script(status=status, body={"error": {"message": "bad thing", "type": "invalid_request_error"}})
    )
    gw = gateway_factory(fleet(upstreams))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t0", "messages": MSG})
    assert r.status_code == status and r.json()["error"]["message"] == "bad thing"
    assert len(upstreams["a"].requests) == 1 and not upstreams["b"].requests


def test_one_retry_budget_covers_retries_and_fallbacks(upstreams, gateway_factory) -> None:
    upstreams["a"].default = Script(status=503)
    upstreams["b"].default = Script(status=503)
    gw = gateway_factory(fleet(upstreams))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t0", "messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["type"] == "upstream_error"
    assert len(upstreams["a"].requests) + len(upstreams["b"].requests) == 3


def test_breaker_ejects_a_failing_backend(upstreams, gateway_factory) -> None:
    upstreams["a"].default = Script(status=500)
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"]["fallback"] = []
    cfg["tiers"]["T0"]["backends"] = [
        {"name": "a", "base_url": upstreams["a"].base_url},
        {"name": "c", "base_url": upstreams["c"].base_url},
    ]
    gw = gateway_factory(cfg)
    for _ in range(20):
        httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG})
    # 3 consecutive failures open the breaker; after that every request goes to c.
    assert len(upstreams["a"].requests) == 3 and len(upstreams["c"].requests) >= 17


def test_breaker_half_open_probe_restores_backend(upstreams, gateway_factory) -> None:
    upstreams["a"].push(*[Script(status=500)] * 3)
    cfg = fleet(upstreams, breaker={"failures": 3, "cooldown": 0.5})
    cfg["tiers"]["T0"]["fallback"] = []
    gw = gateway_factory(cfg)
    for _ in range(3):
        assert httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG}).status_code == 502
    r = httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend"  # open
    time.sleep(0.6)  # the cooldown itself is what is under test
    assert httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG}).status_code == 200  # probe
    assert httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG}).status_code == 200  # closed


# -- timeouts and streams that break -----------------------------------------------------------------------


def test_first_byte_timeout_gives_504(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(delay=3))
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"].update(fallback=[], timeouts={"first_byte": 0.3})
    gw = gateway_factory(cfg)
    t0 = time.monotonic()
    r = httpx.post(gw.url + "/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout_first_byte"
    assert time.monotonic() - t0 < 2


def test_total_timeout_ends_a_long_stream_in_band(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(n_chunks=50, chunk_delay=0.1))
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"].update(fallback=[], timeouts={"total": 0.6, "idle": 5})
    gw = gateway_factory(cfg)
    with pytest.raises(openai.APIError) as e:
        list(client(gw).chat.completions.create(model="qlp-t0", messages=MSG, stream=True))
    assert "timeout_total" in str(e.value.body) or "timeout_total" in str(e.value)


def test_idle_timeout_mid_stream_yields_in_band_error(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(n_chunks=3, chunk_delay=1.5))
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"].update(fallback=[], timeouts={"idle": 0.3})
    gw = gateway_factory(cfg)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={"messages": MSG, "stream": True}) as r:
        raw = r.read()
    last = raw.strip().split(b"\n\n")[-1]
    assert json.loads(last[6:])["error"]["code"] == "timeout_idle"


def test_upstream_dying_mid_stream_yields_in_band_error(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(n_chunks=5, cut_after=3))
    gw = gateway_factory(fleet(upstreams))
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        for c in client(gw).chat.completions.create(model="qlp-t0", messages=MSG, stream=True):
            seen.append(c.choices[0].delta.content or "")
    assert seen[:3] == ["", "hello0 ", "hello1 "] and not upstreams["b"].requests  # no fallback after first byte


def test_client_disconnect_closes_the_upstream_within_a_second(upstreams, gateway_factory) -> None:
    upstreams["a"].push(Script(n_chunks=200, chunk_delay=0.05))
    gw = gateway_factory(fleet(upstreams))
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={"messages": MSG, "stream": True}) as r:
        next(r.iter_bytes())
    t_closed = time.monotonic()
    assert upstreams["a"].disconnected.wait(2.0)
    assert upstreams["a"].disconnect_time - t_closed < 1.0


# -- external tier ------------------------------------------------------------------------------------------


def t3_fleet(ups: dict[str, FakeUpstream]) -> dict[str, Any]:
    cfg = fleet(ups)
    cfg["tiers"]["T3"] = {
        "kind": "openai",
        "model": "gpt-4",
        "aliases": ["qlp-t3"],
        "backends": [{"name": "openai", "base_url": ups["c"].base_url, "api_key_secret": "t3_api_key"}],
    }
    return cfg


def test_t3_not_configured_is_503_naming_the_setting(upstreams, gateway_factory, monkeypatch) -> None:
    monkeypatch.delenv("QLP_T3_API_KEY", raising=False)
    gw = gateway_factory(t3_fleet(upstreams))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG})
    assert r.status_code == 503 and "QLP_T3_API_KEY" in r.json()["error"]["message"]
    assert not upstreams["c"].requests


def test_t3_key_from_secrets_file_is_sent_and_never_leaked(upstreams, gateway_factory, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("QLP_T3_API_KEY", raising=False)
    canary = "sk-canary-1234567890abcdef"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "t3_api_key").write_text(canary + "\n")
    upstreams["c"].push(Script(status=400, body={"error": {"message": f"Incorrect API key provided: {canary}"}}))
    gw = gateway_factory(t3_fleet(upstreams))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG})
    assert upstreams["c"].requests[0]["headers"]["Authorization"] == f"Bearer {canary}"
    assert r.status_code == 400 and canary not in r.text and "canary" not in r.text
    ok = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG})
    assert ok.status_code == 200 and ok.headers["x-qlp-tier"] == "T3"
