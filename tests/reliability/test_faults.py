"""Network faults between the gateway and its upstream, injected by a TCP proxy (tests/fakes/faultproxy.py):
every timeout trips on time, retries stay within `retry.max_attempts` (counted as connections at the
proxy), and the circuit breaker opens, stays open without touching the upstream, and recovers through one
half-open probe. Timings allow for a slow shared machine: never early, at most TOLERANCE late.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.breaker import BreakerState
from tests.fakes.faultproxy import FaultProxy
from tests.fakes.gateway import RunningGateway
from tests.fakes.listeners import full_accept_queue
from tests.fakes.upstream import Script
from tests.reliability.conftest import MSG
from tests.wait import eventually

TOLERANCE = 1.0
FAULTS_SURVIVED: dict[str, int] = {}


def config(
    base_url: str,
    *,
    timeouts: dict[str, float] | None = None,
    attempts: int = 3,
    breaker: dict[str, float] | None = None,
    t1_url: str | None = None,
) -> dict[str, Any]:
    t0: dict[str, Any] = {
        "model": "m0",
        "aliases": ["qlp-t0"],
        "backends": [{"name": "a", "base_url": base_url}],
        "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30, **(timeouts or {})},
    }
    tiers: dict[str, Any] = {"T0": t0}
    if t1_url is not None:
        t0["fallback"] = ["T1"]
        tiers["T1"] = {"model": "m1", "aliases": ["qlp-t1"], "backends": [{"name": "b", "base_url": t1_url}]}
    return {
        "default_tier": "T0",
        "health_interval": 60,
        "retry": {"max_attempts": attempts, "backoff_base": 0.001, "backoff_max": 0.01},
        "breaker": breaker or {"failures": 50, "cooldown": 60},
        "tiers": tiers,
    }


def chat(gw: RunningGateway, stream: bool = False) -> tuple[httpx.Response, bytes, float]:
    t0 = time.monotonic()
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "qlp-t0", "messages": MSG, "stream": stream}, timeout=30
    ) as r:
        body = r.read()
    return r, body, time.monotonic() - t0


def error_code(r: httpx.Response, body: bytes) -> str | None:
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        last = json.loads(events[-1][6:])
        return last.get("error", {}).get("code") if "error" in last else None
    return json.loads(body)["error"]["code"] if r.status_code >= 400 else None


def survived(kind: str) -> None:
    FAULTS_SURVIVED[kind] = FAULTS_SURVIVED.get(kind, 0) + 1


@pytest.fixture
def gw_via(proxy: FaultProxy, gateway_factory: Callable[..., RunningGateway]) -> Callable[..., RunningGateway]:
    def make(**kw: Any) -> RunningGateway:
        return gateway_factory(config(proxy.base_url, **kw))

    return make


@pytest.fixture
def full_listener() -> Iterator[str]:
    """A listener whose accept queue is full: connect() to it hangs."""
    with full_accept_queue() as port:
        yield f"http://127.0.0.1:{port}/v1"


# -- timeouts ---------------------------------------------------------------------------------------------


def test_connect_timeout_trips_on_time_on_every_attempt(full_listener, gateway_factory) -> None:
    gw = gateway_factory(config(full_listener, timeouts={"connect": 0.3}, attempts=3))
    r, body, took = chat(gw)
    assert r.status_code == 504 and error_code(r, body) == "timeout_connect"
    assert 3 * 0.3 <= took < 3 * 0.3 + TOLERANCE, took  # retryable: three attempts, each 0.3 s
    survived("connect timeout")


def test_first_byte_timeout_trips_on_time_against_a_black_hole(proxy, gw_via) -> None:
    proxy.set("blackhole")
    gw = gw_via(timeouts={"first_byte": 0.5}, attempts=3)
    for stream in (False, True):
        r, body, took = chat(gw, stream)
        assert r.status_code == 504 and error_code(r, body) == "timeout_first_byte"
        assert 0.5 <= took < 0.5 + TOLERANCE, took
        survived("black hole")
    assert proxy.connections == 2  # a request the upstream may be working on is not sent again


def test_latency_within_the_first_byte_budget_is_served_and_beyond_it_times_out(proxy, gw_via) -> None:
    proxy.set("latency", latency=0.2)  # each way: the answer starts >= 0.4 s after the request
    patient = gw_via(timeouts={"first_byte": 2.0})
    r, _, took = chat(patient)
    assert r.status_code == 200 and took >= 0.4
    hasty = gw_via(timeouts={"first_byte": 0.25})
    r, body, took = chat(hasty)
    assert r.status_code == 504 and error_code(r, body) == "timeout_first_byte" and took < 0.25 + TOLERANCE
    survived("latency")


def test_idle_timeout_mid_stream_ends_it_in_band_and_frees_the_upstream(proxy, gw_via, upstreams) -> None:
    upstreams["a"].default = Script(n_chunks=40, chunk_delay=0.005)
    proxy.set("stall", after=900)  # the response head and a few chunks, then silence
    gw = gw_via(timeouts={"idle": 0.4})
    r, body, took = chat(gw, stream=True)
    assert r.status_code == 200 and b"hello0" in body and b"[DONE]" not in body
    assert error_code(r, body) == "timeout_idle"
    assert 0.4 <= took < 0.4 + TOLERANCE, took
    eventually(lambda: proxy.live == 0, timeout=5, what="the stalled upstream connection closed")
    survived("stall mid-stream")


def test_total_timeout_ends_a_long_stream_in_band_on_time(proxy, gw_via, upstreams) -> None:
    upstreams["a"].default = Script(n_chunks=200, chunk_delay=0.02)  # ~4 s of stream, never idle
    gw = gw_via(timeouts={"idle": 0.5, "total": 1.0})
    r, body, took = chat(gw, stream=True)
    assert r.status_code == 200 and error_code(r, body) == "timeout_total"
    assert 1.0 <= took < 1.0 + TOLERANCE, took
    survived("endless stream")


# -- broken connections -------------------------------------------------------------------------------------


def test_reset_before_the_first_byte_is_retried_exactly_max_attempts_times(proxy, gw_via, upstreams) -> None:
    proxy.set("reset")
    gw = gw_via(attempts=3)
    r, body, _ = chat(gw)
    assert r.status_code == 502 and error_code(r, body) == "connect"
    assert proxy.connections == 3 and not upstreams["a"].requests
    survived("reset")


def test_one_attempt_budget_covers_retries_and_fallbacks(upstreams, gateway_factory) -> None:
    first, second = FaultProxy(upstreams["a"].port).start(), FaultProxy(upstreams["b"].port).start()
    try:
        first.set("reset")
        second.set("reset")
        gw = gateway_factory(config(first.base_url, attempts=4, t1_url=second.base_url))
        r, _, _ = chat(gw)
        assert r.status_code == 502
        assert first.connections + second.connections == 4 and second.connections >= 1
        second.set("pass")
        first.reset_counters()
        second.reset_counters()
        r, _, _ = chat(gw)
        assert r.status_code == 200 and r.headers["x-qlp-tier"] == "T1"
        assert first.connections + second.connections <= 4
        survived("reset, fallback")
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("rst", [False, True])
def test_cut_mid_response_is_a_502_or_an_in_band_error(proxy, gw_via, upstreams, rst) -> None:
    upstreams["a"].push(Script(n_chunks=40), Script(content="x" * 3000))
    proxy.set("cut", after=700, rst=rst)
    gw = gw_via(attempts=3)
    r, body, _ = chat(gw, stream=True)
    assert r.status_code == 200 and b"[DONE]" not in body
    assert error_code(r, body) in ("stream_truncated", "protocol")
    r, body, _ = chat(gw, stream=False)
    assert r.status_code == 502 and error_code(r, body) == "protocol"
    # A half-read answer is never retried: the upstream produced (and may bill) it.
    assert proxy.connections == 2
    survived("cut" + (" (RST)" if rst else " (FIN)"))


# -- the breaker ----------------------------------------------------------------------------------------------


def test_breaker_opens_after_n_failures_and_recovers_through_one_half_open_probe(proxy, gw_via) -> None:
    proxy.set("reset")
    gw = gw_via(attempts=1, breaker={"failures": 3, "cooldown": 1.0})
    breaker = gw.runtime.breakers["T0/a"]

    def ended_with(status: int) -> float | None:
        """Send one request; when it got `status`, the time it ended."""
        return time.monotonic() if chat(gw)[0].status_code == status else None

    assert [chat(gw)[0].status_code for _ in range(3)] == [502, 502, 502]
    assert breaker.state is BreakerState.OPEN and proxy.connections == 3
    tripped = breaker.opened_at  # the gateway's own clock: this process's monotonic clock
    r, body, _ = chat(gw)
    assert r.status_code == 503 and error_code(r, body) == "no_healthy_backend"
    assert proxy.connections == 3  # open: the upstream is left alone
    # Still failing after the cooldown: the one probe fails and the breaker opens again.
    probed = eventually(lambda: ended_with(502), timeout=5, what="the half-open probe")
    assert probed - tripped >= 1.0
    assert breaker.state is BreakerState.OPEN and proxy.connections == 4
    # Healthy again: after the next cooldown one probe goes through, succeeds, and the breaker closes.
    tripped = breaker.opened_at
    proxy.set("pass")
    recovered = eventually(lambda: ended_with(200), timeout=5, what="recovery")
    assert recovered - tripped >= 1.0 and breaker.state is BreakerState.CLOSED
    assert proxy.connections == 5  # every request in between was refused without an upstream attempt
    assert [chat(gw)[0].status_code for _ in range(3)] == [200, 200, 200]
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'qlp_backend_breaker_state{backend="a",tier="T0"} 0.0' in metrics
    survived("breaker open/half-open/closed")
