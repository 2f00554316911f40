"""The booking process (gateway/metering/bookd.py, outbox.py): a busy key's charges are booked by a child of
the gateway process. Nothing is lost when the child is killed, when Redis is away, or when the gateway stops."""

from __future__ import annotations

import concurrent.futures
import os
import signal

import httpx

from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import Script
from tests.metering.conftest import auth, create_key, eventually
from tests.metering.test_leases import _burst
from tests.metering.test_limits import reserved, spent_today
from tests.metering.test_outage import ledger_totals


def _booked(gw, key: str) -> int:  # type: ignore[no-untyped-def]
    r = httpx.get(gw.url + "/v1/ledger/summary?group_by=tier", headers=auth(key), timeout=10)
    return int(r.json()["total"]["requests"])


def test_a_killed_booking_process_loses_no_charge_and_is_replaced(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=10)  # 10 micro-USD each
    key, info = create_key(redis_url, "acme", budget_day_micros=10**9, rpm=10**6)
    gw = metered(admission_lease_seconds=1.0)
    outbox = gw.runtime.meter.outbox
    assert _burst(gw.url, key, 100) == [200] * 100  # busy: its charges go to the booking process
    first = outbox._proc
    assert not outbox.inline
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        more = pool.submit(_burst, gw.url, key, 300)
        eventually(lambda: spent_today(redis_url, info.id) > 1500, what="the second burst under way")
        os.kill(first.pid, signal.SIGKILL)  # mid-burst: frames sent and not acked yet are booked by the gateway
        assert more.result() == [200] * 300
    assert eventually(lambda: spent_today(redis_url, info.id) == 4000, what="400 requests' spend")
    eventually(lambda: not outbox.inline and outbox._proc is not first, what="a new booking process")
    assert _burst(gw.url, key, 100) == [200] * 100  # booked by the new one
    assert eventually(lambda: spent_today(redis_url, info.id) == 5000, what="500 requests' spend")
    assert eventually(lambda: reserved(redis_url, info.id) == 0, what="the leases' reservations released")
    assert _booked(gw, key) == 500  # each once: what the first child booked before it died is not booked twice


def test_stopping_the_gateway_books_everything_its_booking_process_was_sent(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(completion_tokens=10)
    key, info = create_key(redis_url, "acme", budget_day_micros=10**9, rpm=10**6)
    gw = metered(admission_lease_seconds=5.0)  # the lease outlives the burst: its release comes with the stop
    assert _burst(gw.url, key, 200) == [200] * 200
    child = gw.runtime.meter.outbox._proc
    gw.stop()
    assert child.poll() is not None  # it exited with the gateway
    assert spent_today(redis_url, info.id) == 2000
    assert reserved(redis_url, info.id) == 0


def test_charges_the_booking_process_cannot_book_are_spooled_and_replayed(metered, upstreams, tmp_path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        upstreams["a"].default = Script(completion_tokens=3)
        key, info = create_key(server.url, "acme", rpm=10**6)
        gw = metered(redis_url=server.url, admission_lease_seconds=10.0, spool_replay_interval=0.05,
                     admission_when_redis_down="open")
        assert _burst(gw.url, key, 100) == [200] * 100  # a lease with room to spare for what follows
        eventually(lambda: ledger_totals(server, info.id)["req"] == 100, what="100 requests booked")
        server.kill()
        assert _burst(gw.url, key, 30) == [200] * 30  # admitted from the lease; the child spools their charges
        eventually(lambda: httpx.get(gw.url + "/readyz").json()["ledger"]["spool_depth"] >= 30, what="30 spooled")
        server.start()
        eventually(lambda: ledger_totals(server, info.id)["req"] == 130, what="130 requests in the ledger")
        assert ledger_totals(server, info.id)["ct"] == 390
    finally:
        server.stop()
