"""Hostile input gets the right 4xx, never a 5xx, never reaches an upstream, and leaves memory flat.

Oversize bodies (with a length, and chunked without one) on every route that takes a body; JSON nested
deeper than any parser should follow; invalid UTF-8 in bodies and headers; absurd `max_tokens` and `n`;
empty and malformed messages; CR/LF smuggled into the headers the gateway reads or echoes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.gateway import RunningGateway
from tests.fakes.upstream import FakeUpstream
from tests.reliability.conftest import MSG, GatewayProcess, Tenants, auth, fleet
from tests.reliability.rawhttp import RawResponse, exchange

LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"
# Every route that reads a body (PUT /v1/admin/rollouts/... reads it the same way as POST /v1/admin/routes).
BODY_ROUTES = [CHAT, "/v1/completions", "/v1/admin/keys", "/v1/admin/routes", "/v1/feedback"]


def nested(depth: int) -> bytes:
    return (
        b'{"model": "qlp-t0", "messages": [{"role": "user", "content": "hi"}], "x": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


def envelope(r: httpx.Response | RawResponse, status: int, code: str | None = None) -> dict[str, Any]:
    body = r.json()
    got = r.status if isinstance(r, RawResponse) else r.status_code
    assert got == status, (got, body)
    assert isinstance(body, dict) and set(body) == {"error"}
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture
def gw(metered: Callable[..., RunningGateway]) -> RunningGateway:
    return metered(max_body_bytes=LIMIT)


def head(path: str, key: str, *extra: bytes, length: int | None = None) -> bytes:
    lines = [
        b"POST " + path.encode() + b" HTTP/1.1",
        b"Host: gw",
        b"Content-Type: application/json",
        b"Authorization: Bearer " + key.encode(),
        *extra,
    ]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines)


# -- size ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_body_over_the_limit_with_a_length_is_413_on_every_route(gw, tenants: Tenants, upstreams, path) -> None:
    key = tenants.admin if path.startswith("/v1/admin") else tenants.a
    body = orjson.dumps({"tenant": "x", "messages": MSG, "prompt": "p", "pad": "x" * (LIMIT * 4)})
    envelope(
        httpx.post(gw.url + path, content=body, headers={**auth(key), "content-type": "application/json"}),
        413,
        "request_too_large",
    )
    # A length that is a lie (a gigabyte announced, a few bytes sent) is refused on the announcement.
    r = exchange(gw.port, head(path, key, length=10**9), b"{}")
    envelope(r, 413, "request_too_large")
    assert not upstreams["a"].requests


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_chunked_body_over_the_limit_is_413_on_every_route(gw, tenants: Tenants, upstreams, path) -> None:
    key = tenants.admin if path.startswith("/v1/admin") else tenants.a
    r = exchange(gw.port, head(path, key), chunks=[b'{"pad": "'] + [b"x" * 4096] * 64 + [b'"}'])
    envelope(r, 413, "request_too_large")
    assert not upstreams["a"].requests


# -- structure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [300, 1_100, 10_000])
@pytest.mark.parametrize("path", [CHAT, "/v1/admin/keys", "/v1/feedback", "/v1/admin/routes"])
def test_deeply_nested_json_is_400(gw, tenants: Tenants, upstreams, depth, path) -> None:
    # 300: deeper than orjson writes (254), shallower than it reads (1024): it was a 500 on the proxy path.
    key = tenants.admin if path.startswith("/v1/admin") else tenants.a
    r = httpx.post(gw.url + path, content=nested(depth), headers={**auth(key), "content-type": "application/json"})
    envelope(r, 400)
    assert not upstreams["a"].requests


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\xff\xfe", "messages": []}',
        b"\xc3\x28",
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    ],
)
@pytest.mark.parametrize("path", [CHAT, "/v1/admin/keys", "/v1/feedback", "/v1/admin/routes"])
def test_invalid_utf8_in_the_body_is_400(gw, tenants: Tenants, upstreams, raw, path) -> None:
    key = tenants.admin if path.startswith("/v1/admin") else tenants.a
    envelope(httpx.post(gw.url + path, content=raw, headers={**auth(key), "content-type": "application/json"}), 400)
    assert not upstreams["a"].requests


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
        ({"n": 10**6}, "n"),
        ({"n": -1}, "n"),
        ({"max_tokens": 1e300}, "max_tokens"),
        ({"n": 2**70}, "n"),
        ({"max_tokens": "1000"}, "max_tokens"),
        ({"n": [1]}, "n"),
        ({"n": {"$gt": 1}}, "n"),
    ],
)
def test_absurd_sizes_are_400_before_any_reservation(gw, tenants: Tenants, upstreams, redis_url, fields, param) -> None:
    envelope(httpx.post(gw.url + CHAT, json={"messages": MSG, **fields}, headers=auth(tenants.a)), 400)
    assert not upstreams["a"].requests


@pytest.mark.parametrize(
    "messages",
    [
        [],
        None,
        "hi",
        {},
        {"role": "user"},
        [None],
        [[]],
        ["hi"],
        [{}],
        [{"role": {}}],
        [{"role": ["user"]}],
        [{"role": None, "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": {"a": 1}}],
        [{"role": "system", "content": None}],
    ],
)
def test_empty_and_malformed_messages_are_400(gw, tenants: Tenants, upstreams, messages) -> None:
    body = {"model": "qlp-t0"} if messages is None else {"model": "qlp-t0", "messages": messages}
    envelope(httpx.post(gw.url + CHAT, json=body, headers=auth(tenants.a)), 400)
    assert not upstreams["a"].requests


# -- headers --------------------------------------------------------------------------------------------

INJECTIONS = [
    b"a\r\nX-Injected: 1",
    b"a\nX-Injected: 1",
    b"a\rX-Injected: 1",
    b"a\r\n\r\nGET / HTTP/1.1",
    b"a\x00b",
    b"\xff\xfe\xfd",
    b"a\r\n X-Injected: 1",
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize(
    "name", [b"X-Request-Id", b"X-QLP-Workflow-Id", b"X-QLP-Agent", b"X-QLP-Tier", b"Authorization"]
)
def test_header_injection_is_refused_or_inert(gw, tenants: Tenants, upstreams, name, value) -> None:
    extra = name + b": " + value
    lines = [b"POST " + CHAT.encode() + b" HTTP/1.1", b"Host: gw", b"Content-Type: application/json"]
    if name != b"Authorization":
        lines.append(b"Authorization: Bearer " + tenants.a.encode())
    body = orjson.dumps({"model": "qlp-t0", "messages": MSG})
    r = exchange(gw.port, b"\r\n".join([*lines, extra, b"Content-Length: %d" % len(body)]), body)
    # The HTTP parser may refuse the request outright (400, or closing the connection); if it gets through,
    # the value is only data: no 5xx, no header of the caller's making in the answer or upstream.
    assert r.status == 0 or r.status < 500, r
    assert all(k.lower() != "x-injected" for k, _ in r.headers)
    for req in upstreams["a"].requests:
        assert not any(k.lower() == "x-injected" for k in req["headers"])
        assert all("\r" not in v and "\n" not in v for v in req["headers"].values())
    rid = r.header("x-request-id")
    assert rid is None or all(c.isalnum() or c in "._:-" for c in rid)


def test_request_id_is_echoed_only_when_it_is_plain(gw, tenants: Tenants, upstreams) -> None:
    ok = httpx.post(gw.url + CHAT, json={"messages": MSG}, headers={**auth(tenants.a), "X-Request-Id": "abc.DEF:1-2_3"})
    assert ok.headers["x-request-id"] == "abc.DEF:1-2_3"
    odd = httpx.post(
        gw.url + CHAT,
        json={"messages": MSG},
        headers={**auth(tenants.a), "X-Request-Id": "<script>alert(1)</script>" + "x" * 200},
    )
    assert odd.status_code == 200 and len(odd.headers["x-request-id"]) == 32 and "<" not in odd.headers["x-request-id"]
    sent = {k.lower(): v for k, v in upstreams["a"].requests[-1]["headers"].items()}
    assert sent["x-request-id"] == odd.headers["x-request-id"]


# -- memory -----------------------------------------------------------------------------------------------

HOSTILE_ROUNDS = 2_000


async def _hostile_load(port: int, key: str, n: int) -> dict[int, int]:
    """n hostile requests, 8 at a time, over fresh and kept-alive connections; statuses counted."""
    statuses: dict[int, int] = {}
    bodies = [
        b"x" * (LIMIT * 2),
        nested(10_000),
        nested(300),
        b'{"messages": "\xff"}',
        orjson.dumps({"messages": MSG, "max_tokens": 10**12}),
        orjson.dumps({"messages": [{"role": {}}]}),
        orjson.dumps({"messages": []}),
        b"[" * 5000,
    ]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

        async def one(i: int) -> None:
            path = "/v1/admin/keys" if i % 5 == 0 else CHAT
            h = {
                **auth(key),
                "content-type": "application/json",
                "X-QLP-Agent": "a" * 1000,
                "X-QLP-Workflow-Id": b"\xff" * 200,
            }
            if i % 7 == 0:
                status = await asyncio.to_thread(
                    lambda: exchange(port, head(path, key), chunks=[b"x" * 4096] * 24).status
                )
            else:
                status = (await client.post(path, content=bodies[i % len(bodies)], headers=h)).status_code
            statuses[status] = statuses.get(status, 0) + 1

        sem = asyncio.Semaphore(8)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(n)))
    return statuses


def test_memory_stays_flat_under_hostile_input(
    gateway_process, upstreams: dict[str, FakeUpstream], redis_url, pricing_file, tenants: Tenants, tmp_path
) -> None:
    gp: GatewayProcess = gateway_process(
        fleet(upstreams),
        env={
            "QLP_METERING": "true",
            "QLP_REDIS_URL": redis_url,
            "QLP_PRICING": str(pricing_file),
            "QLP_MAX_BODY_BYTES": str(LIMIT),
        },
        log_level="warning",
    )
    asyncio.run(_hostile_load(gp.port, tenants.a, 300))  # warm-up: imports, pools, allocator arenas
    before = gp.rss_kib()
    statuses = asyncio.run(_hostile_load(gp.port, tenants.a, HOSTILE_ROUNDS))
    after = gp.rss_kib()
    assert sum(statuses.values()) == HOSTILE_ROUNDS
    assert all(400 <= s < 500 for s in statuses), statuses
    assert not upstreams["a"].requests
    assert after < before * 1.10, f"RSS grew from {before} KiB to {after} KiB"
    print(f"hostile input: {HOSTILE_ROUNDS} requests {statuses}; RSS {before} -> {after} KiB")
