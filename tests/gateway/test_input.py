"""Bad input gets OpenAI's error envelope with the right status, before any upstream is called."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.gateway.test_proxy import MSG, fleet


@pytest.fixture
def gw(upstreams, gateway_factory):  # type: ignore[no-untyped-def]
    return gateway_factory(fleet(upstreams), max_body_bytes=4096)


def post(gw: Any, **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", **kw)


def assert_envelope(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and "detail" not in body
    if code is not None:
        assert body["error"]["code"] == code
    return dict(body["error"])


@pytest.mark.parametrize(
    ("payload", "code", "param"),
    [
        ({"messages": []}, "invalid_value", "messages"),
        ({}, "invalid_value", "messages"),
        ({"messages": "hi"}, "invalid_value", "messages"),
        ({"messages": ["hi"]}, "invalid_type", "messages[0]"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "invalid_value", "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
        ({"messages": MSG, "n": 1000}, "invalid_value", "n"),
        ({"messages": MSG, "n": 0}, "invalid_value", "n"),
        ({"messages": MSG, "n": "2"}, "invalid_type", "n"),
        ({"messages": MSG, "max_tokens": 10**9}, "invalid_value", "max_tokens"),
        ({"messages": MSG, "max_tokens": -1}, "invalid_value", "max_tokens"),
        ({"messages": MSG, "max_tokens": True}, "invalid_type", "max_tokens"),
        ({"messages": MSG, "stream": "yes"}, "invalid_type", "stream"),
        ({"messages": MSG, "model": 7}, "invalid_type", "model"),
        ({"messages": MSG, "stream_options": 1}, "invalid_type", "stream_options"),
        ({"messages": MSG, "temperature": 5}, "invalid_value", "temperature"),
        ({"messages": MSG, "temperature": -0.1}, "invalid_value", "temperature"),
        ({"messages": MSG, "temperature": "hot"}, "invalid_type", "temperature"),
        ({"messages": MSG, "top_p": 1.5}, "invalid_value", "top_p"),
        ({"messages": MSG, "presence_penalty": 3}, "invalid_value", "presence_penalty"),
        ({"messages": MSG, "frequency_penalty": -2.5}, "invalid_value", "frequency_penalty"),
        ({"messages": MSG, "logprobs": 3}, "invalid_type", "logprobs"),
        ({"messages": MSG, "top_logprobs": 21}, "invalid_value", "top_logprobs"),
        ({"messages": MSG, "seed": 1.5}, "invalid_type", "seed"),
        ({"messages": MSG, "seed": 2**64}, "invalid_value", "seed"),
        ({"messages": MSG, "seed": 2**63}, "invalid_value", "seed"),
        # Beyond 64 bits JSON parsing gives a rounded float (-2.0**63): still refused, not taken as -2**63.
        ({"messages": MSG, "seed": -(2**63) - 1}, "invalid_value", "seed"),
        ({"messages": MSG, "stop": [1]}, "invalid_type", "stop"),
        ({"messages": MSG, "logit_bias": {"5": 101}}, "invalid_value", "logit_bias"),
        ({"messages": MSG, "logit_bias": [1]}, "invalid_type", "logit_bias"),
        ({"messages": MSG, "tools": {"type": "function"}}, "invalid_type", "tools"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(gw, upstreams, payload, code, param) -> None:  # type: ignore[no-untyped-def]
    r = post(gw, json=payload)
    err = assert_envelope(r, 400, code)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert r.headers["x-should-retry"] == "false" and r.headers["x-request-id"]
    assert not upstreams["a"].requests


def test_documented_edges_of_the_ranges_are_accepted(gw, upstreams) -> None:  # type: ignore[no-untyped-def]
    ok = {
        "temperature": 2,
        "top_p": 0,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "logprobs": True,
        "top_logprobs": 20,
        "seed": -1,
        "stop": ["a", "b"],
        "logit_bias": {"50256": -100},
    }
    r = post(gw, json={"messages": MSG, **ok})
    assert r.status_code == 200, r.text
    assert {k: upstreams["a"].requests[0]["body"][k] for k in ok} == ok
    for i, seed in enumerate((2**63 - 1, -(2**63)), start=1):  # int64's edges, as OpenAI documents seed
        assert post(gw, json={"messages": MSG, "seed": seed}).status_code == 200
        assert upstreams["a"].requests[i]["body"]["seed"] == seed


def test_unknown_model_is_404_model_not_found_and_not_retried(gw, upstreams) -> None:  # type: ignore[no-untyped-def]
    r = post(gw, json={"model": "gpt-4o-mini", "messages": MSG})
    err = assert_envelope(r, 404, "model_not_found")
    assert err["param"] == "model" and r.headers["x-should-retry"] == "false"
    assert not upstreams["a"].requests


def test_catch_all_serves_an_unknown_model_on_the_default_tier(upstreams, gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(fleet(upstreams, catch_all=True))
    r = post(gw, json={"model": "gpt-4o-mini", "messages": MSG})
    assert r.status_code == 200 and r.headers["x-qlp-tier"] == "T0"


@pytest.mark.parametrize("raw", [b"{bad", b"[1,2]", b"", b"\xff\xfe", b'"str"', b"null"])
def test_bad_json_is_400(gw, raw) -> None:  # type: ignore[no-untyped-def]
    assert_envelope(post(gw, content=raw, headers={"content-type": "application/json"}), 400, "invalid_json")


def test_wrong_content_type_is_400(gw) -> None:  # type: ignore[no-untyped-def]
    r = post(gw, content=b"messages=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert_envelope(r, 400, "unsupported_content_type")


def test_unknown_tier_is_400(gw) -> None:  # type: ignore[no-untyped-def]
    assert_envelope(post(gw, json={"messages": MSG}, headers={"X-QLP-Tier": "T9"}), 400, "unknown_tier")


def test_unknown_model_without_default_tier_is_404(upstreams, gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(fleet(upstreams, default_tier=None))
    assert_envelope(post(gw, json={"model": "nope", "messages": MSG}), 404, "model_not_found")


def test_body_over_limit_is_413_from_content_length(gw, upstreams) -> None:  # type: ignore[no-untyped-def]
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_envelope(post(gw, json=big), 413, "request_too_large")
    assert not upstreams["a"].requests


def test_chunked_body_over_limit_is_413(gw, upstreams) -> None:  # type: ignore[no-untyped-def]
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(64):
            sent += 1
            yield b"x" * 1024
        yield b'"}]}'

    r = post(gw, content=body(), headers={"content-type": "application/json"})
    assert_envelope(r, 413, "request_too_large")
    assert not upstreams["a"].requests


def test_unknown_route_and_wrong_method_use_the_envelope(gw) -> None:  # type: ignore[no-untyped-def]
    for r, status in (
        (httpx.get(gw.url + "/v1/nothing"), 404),
        (httpx.get(gw.url + "/v1/chat/completions"), 405),
        (httpx.delete(gw.url + "/v1/models"), 405),
    ):
        assert_envelope(r, status)
        assert len(r.headers["x-request-id"]) == 32 and r.headers["x-should-retry"] == "false"
    r = httpx.get(gw.url + "/v1/nothing", headers={"X-Request-Id": "mine-1"})
    assert r.headers["x-request-id"] == "mine-1"
    assert httpx.get(gw.url + "/v1/models").headers["x-request-id"]


def test_models_lists_tiers_aliases_and_adapters(gw) -> None:  # type: ignore[no-untyped-def]
    data = httpx.get(gw.url + "/v1/models").json()["data"]
    ids = {m["id"]: m for m in data}
    assert {"T0", "T1", "qlp-t0", "qlp-t1", "dev-v1"} <= set(ids)
    assert ids["dev-v1"]["tier"] == "T0" and ids["dev-v1"]["agents"] == ["developer"]
    assert ids["qlp-t1"]["tier"] == "T1"


def test_healthz_is_ok_and_readyz_reports_each_tier(upstreams, gateway_factory) -> None:  # type: ignore[no-untyped-def]
    cfg = fleet(upstreams)
    for t in cfg["tiers"].values():
        t["backends"][0]["health_path"] = "/health"
    gw = gateway_factory(cfg)
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 200 and r.json()["tiers"]["T1"]["ready"]
    upstreams["b"].health_status = 503
    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 503 and r.json()["tiers"]["T1"]["state"] == "down"
    assert r.json()["tiers"]["T0"]["ready"]
