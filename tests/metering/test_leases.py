"""Admission leases (gateway/metering/lease.py): a busy key is admitted in-process from an allowance
reserved in Redis. Every bound still holds, what a lease did not use is given back, and a revoked key
stops within the lease's lifetime (at once through the admin route of the same process)."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.metering import keys_cli
from gateway.metering.layout import KeyKeys
from tests.fakes.upstream import Script
from tests.metered import ADMIN_KEY, MSG, auth, chat, create_key, metric, run
from tests.metering.test_limits import BODY, reserved, spent_today
from tests.wait import eventually


def _away_from_minute_end() -> None:
    """Rate windows are per UTC minute: start a rate test with most of a minute ahead."""
    into = time.time() % 60
    if into > 40:
        time.sleep(61 - into)


def _burst(url: str, key: str, n: int, concurrency: int = 16, body: dict | None = None) -> list[int]:
    """`n` requests, `concurrency` at a time, as fast as they go: their status codes."""

    async def go() -> list[int]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:

            async def one() -> int:
                async with sem:
                    r = await c.post(
                        url + "/v1/chat/completions",
                        json=body or {"model": "qlp-t0", "messages": MSG},
                        headers=auth(key),
                    )
                    return r.status_code

            return list(await asyncio.gather(*(one() for _ in range(n))))

    return asyncio.run(go())


def _window_requests(redis_url: str, key_id: str) -> int:
    """Requests counted in the key's rate windows (this minute and the one before)."""
    minute = int(time.time() // 60)

    async def go(r):  # type: ignore[no-untyped-def]
        k = KeyKeys(key_id)
        return [await r.hget(k.window(m), "req") for m in (minute - 1, minute)]

    return sum(int(v or 0) for v in run(go, redis_url))


def _spend_the_rest(gws: list, key: str, most: int) -> tuple[int, httpx.Response]:
    """Requests through the gateways in turn until the budget says it is spent: how many were served, and
    the refusal. A refusal for a budget held by reservations (leases, requests in flight: Retry-After 1)
    is waited out, as a client would."""
    served = 0
    for i in range(most + 50):
        r = chat(gws[i % len(gws)], key, BODY)
        if r.status_code == 200:
            served += 1
        elif r.status_code == 429 and r.headers["retry-after"] == "1" and "held" in r.json()["error"]["message"]:
            time.sleep(1.1)
        else:
            return served, r
    raise AssertionError(f"more than {most} requests served")


def test_a_busy_key_books_exactly_and_gives_back_what_its_leases_did_not_use(metered, upstreams, redis_url) -> None:
    _away_from_minute_end()
    upstreams["a"].default = Script(completion_tokens=10)  # 10 micro-USD each (T0: 1 per output token)
    key, info = create_key(redis_url, "acme", budget_day_micros=10**9, rpm=10**6, tpm=10**9)
    gw = metered(admission_lease_seconds=0.3)
    codes = _burst(gw.url, key, 300)
    assert codes == [200] * 300
    assert eventually(lambda: spent_today(redis_url, info.id) == 3000, what="300 requests' spend")
    # Once the leases are closed and their requests settled: nothing stays reserved, and the rate windows
    # count the requests served, not the ones leased.
    assert eventually(lambda: reserved(redis_url, info.id) == 0, what="the leases' reservations released")
    assert eventually(lambda: _window_requests(redis_url, info.id) == 300, what="unused leased requests given back")
    summary = httpx.get(gw.url + "/v1/ledger/summary?group_by=tier", headers=auth(key), timeout=10).json()
    assert summary["total"]["requests"] == 300 and summary["total"]["cost_micros"] == 3000

    # qlp_admissions_total: every admission once, most of them from leases (reported as leases are given back).
    def admitted(how: str) -> float:
        return metric(gw.url, "qlp_admissions_total", how=how)

    eventually(lambda: admitted("lease") + admitted("redis") == 300, what="300 admissions in qlp_admissions_total")
    assert admitted("lease") > admitted("redis") and admitted("without_redis") == 0


def test_a_revoked_key_stops_within_the_lease(metered, upstreams, redis_url) -> None:
    key, info = create_key(redis_url, "acme", rpm=10**6)
    gw = metered(admission_lease_seconds=2.0)
    assert _burst(gw.url, key, 40) == [200] * 40  # busy: admitted from a lease by now
    assert keys_cli.main(["--redis-url", redis_url, "revoke", info.id]) == 0  # another process
    assert chat(gw, key).status_code == 200  # still inside this process's lease
    r = eventually(
        lambda: (lambda r: r if r.status_code == 401 else None)(chat(gw, key)),
        timeout=5,
        what="the revoked key refused once its lease is over",
    )
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_revoking_through_the_admin_route_stops_that_process_at_once(metered, upstreams, redis_url) -> None:
    key, info = create_key(redis_url, "acme", rpm=10**6)
    gw = metered(admission_lease_seconds=5.0)
    assert _burst(gw.url, key, 40) == [200] * 40
    r = httpx.delete(f"{gw.url}/v1/admin/keys/{info.id}", headers=auth(ADMIN_KEY), timeout=10)
    assert r.status_code == 200
    assert chat(gw, key).status_code == 401


def test_without_leases_a_revoked_busy_key_stops_at_once(metered, upstreams, redis_url) -> None:
    key, info = create_key(redis_url, "acme", rpm=10**6)
    gw = metered(admission_lease_seconds=0)
    assert _burst(gw.url, key, 40) == [200] * 40
    assert keys_cli.main(["--redis-url", redis_url, "revoke", info.id]) == 0
    assert chat(gw, key).status_code == 401


def test_budget_holds_with_warm_leases_and_nothing_is_lost(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=100, delay=0.02)  # each costs its worst case: 100
    key, info = create_key(redis_url, "acme", budget_day_micros=60 * 100)  # worth 60 requests
    gw = metered(admission_lease_seconds=0.5)
    first = _burst(gw.url, key, 20, body=BODY)  # the key is busy: leases from here on
    assert first == [200] * 20
    race = _burst(gw.url, key, 80, concurrency=40, body=BODY)  # against the 40 left
    assert set(race) <= {200, 429}
    served = first.count(200) + race.count(200)
    assert served <= 60
    assert eventually(lambda: spent_today(redis_url, info.id) == served * 100, what="the spend booked")
    # Leases hold back headroom only while they live: once they are given back, the rest of the budget is
    # there to the last request, and not one more.
    eventually(lambda: reserved(redis_url, info.id) == 0, what="reservations released")
    more, r = _spend_the_rest([gw], key, 60 - served)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert int(r.headers["retry-after"]) > 1  # spent, not held: until the end of the UTC day
    assert served + more == 60
    assert eventually(lambda: spent_today(redis_url, info.id) == 6000, what="the whole budget spent")
    assert len(upstreams["a"].requests) == 60


def test_two_processes_with_leases_share_one_budget(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=100, delay=0.02)
    key, info = create_key(redis_url, "acme", budget_day_micros=80 * 100)  # worth 80 requests
    gws = [metered(admission_lease_seconds=0.5), metered(admission_lease_seconds=0.5)]
    for gw in gws:  # both busy: each holds leases
        assert _burst(gw.url, key, 12, body=BODY) == [200] * 12

    async def race() -> list[int]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as c:
            rs = await asyncio.gather(
                *(c.post(gws[i % 2].url + "/v1/chat/completions", json=BODY, headers=auth(key)) for i in range(100))
            )
            return [r.status_code for r in rs]

    codes = asyncio.run(race())
    assert set(codes) <= {200, 429}
    served = 24 + codes.count(200)
    assert served <= 80  # never past the budget, whichever process admitted
    eventually(lambda: reserved(redis_url, info.id) == 0, what="both processes' leases given back")
    more, r = _spend_the_rest(gws, key, 80 - served)  # to the last request, through either process
    assert r.json()["error"]["code"] == "budget_exceeded" and int(r.headers["retry-after"]) > 1
    assert served + more == 80
    assert eventually(lambda: spent_today(redis_url, info.id) == 8000, what="the whole budget spent")


def test_requests_per_minute_hold_with_leases(metered, upstreams, redis_url) -> None:
    _away_from_minute_end()
    key, info = create_key(redis_url, "acme", rpm=50)
    gw = metered(admission_lease_seconds=0.3)
    codes = _burst(gw.url, key, 120, concurrency=8)
    assert set(codes) <= {200, 429}
    served = codes.count(200)
    assert 25 <= served <= 50  # a lease takes at most half of what is left: never past the limit
    eventually(lambda: _window_requests(redis_url, info.id) == served, what="unused leased requests given back")
    while chat(gw, key).status_code == 200:  # what leases held back is there again, to the limit
        served += 1
        assert served <= 50
    assert served == 50
