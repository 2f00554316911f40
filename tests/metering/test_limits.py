"""Budgets (reserve the worst case, settle the real cost, release on failure) and rate limits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from gateway.metering.keys import Credential, KeyLimits, KeyStore
from gateway.metering.layout import KeyKeys, day_of
from gateway.metering.ledger import Ledger, LedgerPolicy
from gateway.metering.pipe import RedisPipe
from tests.fakes.upstream import Script
from tests.metered import MSG, auth, chat, create_key, fleet, run
from tests.wait import eventually, eventually_async

# T0 is priced at 1 micro-USD per output token and nothing for input: a request with max_tokens=100
# that the upstream answers with 100 completion tokens costs exactly its worst case, 100 micro-USD.
BODY = {"model": "qlp-t0", "messages": MSG, "max_tokens": 100}


def spent_today(redis_url: str, key_id: str) -> int:
    async def go(r):  # type: ignore[no-untyped-def]
        spent, on = await r.hmget(KeyKeys(key_id).record, "spent_d", "spent_d_on")
        return int(spent or 0) if on == day_of(int(time.time() * 1000)).encode() else 0

    return int(run(go, redis_url))


def reserved(redis_url: str, key_id: str) -> int:
    return int(run(lambda r: r.hget(KeyKeys(key_id).record, "reserved"), redis_url) or 0)


def test_budget_race_admits_at_most_budget(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=100, delay=0.05)
    key, info = create_key(redis_url, "acme", budget_day_micros=10 * 100)  # worth 10 requests
    gw = metered(fleet(upstreams))

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(
                *(c.post(gw.url + "/v1/chat/completions", json=BODY, headers=auth(key)) for _ in range(50))
            )

    responses = asyncio.run(fire())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 50
    assert len(ok) == 10, [r.status_code for r in responses]
    assert len(upstreams["a"].requests) == 10
    assert all(r.json()["error"]["code"] == "budget_exceeded" and int(r.headers["retry-after"]) > 0 for r in refused)
    assert eventually(lambda: spent_today(redis_url, info.id) == 1000, what="spend of 1000 micro-USD")


def test_over_budget_is_429_budget_exceeded_before_any_upstream_call(metered, upstreams, redis_url) -> None:
    key, _ = create_key(redis_url, "acme", budget_day_micros=50)  # less than one worst case
    gw = metered()
    r = chat(gw, key, BODY)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert r.json()["error"]["type"] == "rate_limit_error" and "retry-after" in r.headers
    assert not upstreams["a"].requests


def test_reservation_is_released_when_nothing_was_served(metered, upstreams, redis_url) -> None:
    upstreams["a"].push(Script(status=500))  # not retried, no fallback: nothing is served
    upstreams["a"].default = Script(completion_tokens=100)
    key, info = create_key(redis_url, "acme", budget_day_micros=100)  # exactly one request
    gw = metered(fleet(upstreams, retry={"max_attempts": 2, "backoff_base": 0.001}))
    assert chat(gw, key, BODY).status_code == 502
    # Released, not spent: the budget still admits one full request, and then no more.
    eventually(lambda: reserved(redis_url, info.id) == 0, what="the reservation released")
    assert spent_today(redis_url, info.id) == 0
    assert chat(gw, key, BODY).status_code == 200
    eventually(lambda: spent_today(redis_url, info.id) == 100, what="the spend booked")
    assert chat(gw, key, BODY).status_code == 429


def test_budget_held_by_a_request_in_flight_says_retry_in_a_moment(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=10, delay=1.0)  # reserves 100, costs 10
    key, info = create_key(redis_url, "acme", budget_day_micros=150)
    gw = metered(admission_lease_seconds=0)

    async def two() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            first = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=BODY, headers=auth(key)))
            # the first is in flight (the upstream has it), so its worst case is reserved
            await eventually_async(lambda: upstreams["a"].requests, what="the first request upstream")
            second = await c.post(gw.url + "/v1/chat/completions", json=BODY, headers=auth(key))
            return await first, second

    first, second = asyncio.run(two())
    assert first.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["code"] == "budget_exceeded"
    assert second.headers["retry-after"] == "1" and "held by requests in flight" in second.json()["error"]["message"]
    eventually(lambda: spent_today(redis_url, info.id) == 10 and reserved(redis_url, info.id) == 0)
    assert chat(gw, key, BODY).status_code == 200  # 10 spent + 100 worst case <= 150: room again


def test_settled_cost_replaces_the_reservation(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=10)  # 10 micro-USD of a 100 reservation
    key, info = create_key(redis_url, "acme", budget_day_micros=250)
    gw = metered()
    for _ in range(3):
        assert chat(gw, key, BODY).status_code == 200
    assert eventually(lambda: spent_today(redis_url, info.id) == 30)
    assert reserved(redis_url, info.id) == 0


async def _admit(redis_url: str, key: str, now_ms: int, n: int, worst_tokens: int = 0) -> list[Any]:
    pipe = RedisPipe(redis_url, 5.0)
    try:
        ledger = Ledger(pipe, LedgerPolicy())
        await ledger.load_scripts()
        cred = Credential.of(key)
        return [
            await ledger.admit(cred.sha256, cred.key_id, f"c{i}", 0, worst_tokens, now_ms, 60_000) for i in range(n)
        ]
    finally:
        pipe.close()


def _key(redis_url: str, **limits: int) -> str:
    key, _ = run(lambda r: KeyStore(r).create("acme", limits=KeyLimits(**limits)), redis_url)
    return str(key)


MINUTE = 60_000
T = 28_000_000 * MINUTE + 30_000  # half-way through some minute


def test_requests_per_minute_limit_slides_over_two_windows(redis_url) -> None:
    key = _key(redis_url, rpm=3)
    first = asyncio.run(_admit(redis_url, key, T, 4))
    assert [a.code for a in first] == [0, 0, 0, 3]
    assert first[3].retry_after == 30  # the rest of this minute
    # Next minute, half-way: the previous minute still weighs 3 * 0.5 = 1.5, so two fit (2.5 < 3), not three.
    later = asyncio.run(_admit(redis_url, key, T + MINUTE, 3))
    assert [a.code for a in later] == [0, 0, 3]
    assert later[2].retry_after == 10  # when 3 * (0.5 - t/60) + 2 drops below 3


def test_tokens_per_minute_limit(redis_url) -> None:
    key = _key(redis_url, tpm=1000)
    got = asyncio.run(_admit(redis_url, key, T, 3, worst_tokens=600))
    assert [a.code for a in got] == [0, 0, 4]  # admitted while under the limit; each counts at once


def test_rate_limited_request_is_429_with_retry_after(metered, upstreams, redis_url) -> None:
    key, _ = create_key(redis_url, "acme", rpm=1)
    gw = metered()
    assert chat(gw, key).status_code == 200
    # Two more at once: at a minute boundary the sliding window may admit one of them, never both.
    r1, r2 = chat(gw, key), chat(gw, key)
    limited = [r for r in (r1, r2) if r.status_code == 429]
    assert limited, (r1.status_code, r2.status_code)
    err = limited[0].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert 1 <= int(limited[0].headers["retry-after"]) <= 60
    assert len(upstreams["a"].requests) <= 2
