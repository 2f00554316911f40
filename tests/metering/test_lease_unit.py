"""gateway/metering/lease.py on its own: what a lease admits, when it asks for the next one, and what its
release gives back."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.metering.keys import Principal
from gateway.metering.lease import LEASE_MIN_DEMAND, Lease, Leases
from gateway.metering.ledger import Charge
from tests.wait import eventually_async

P = Principal("acme", "user", "k1")
SHA = "a" * 64
TS = 28_000_000 * 60_000 + 10_000  # 10 s into some minute
MINUTE = TS // 60_000


def _leases(seconds: float = 5.0) -> tuple[Leases, list[Charge], list[tuple[str, Lease, int]]]:
    released: list[Charge] = []
    renewals: list[tuple[str, Lease, int]] = []
    return Leases(seconds, released.append, lambda sha, lease, n: renewals.append((sha, lease, n))), released, renewals


def _run(fn: Any) -> Any:
    async def go() -> Any:
        return fn()

    return asyncio.run(go())


def _busy(leases: Leases, n: int = LEASE_MIN_DEMAND) -> None:
    for _ in range(n):
        assert leases.take(SHA, 10, 100, MINUTE) is None  # no lease yet: each counts toward the demand


def test_a_quiet_key_asks_for_one_request_a_busy_one_for_a_lease() -> None:
    def go() -> None:
        leases, _, _ = _leases()
        assert leases.take(SHA, 10, 100, MINUTE) is None
        assert leases.wanted(SHA) == 1
        _busy(leases)
        n = leases.wanted(SHA)
        assert n >= 2 * LEASE_MIN_DEMAND
        assert leases.wanted(SHA) == 1  # one lease on its way at a time
        assert leases.pending(SHA) is not None
        leases.answered(SHA)
        assert leases.pending(SHA) is None

    _run(go)


def test_a_lease_admits_while_it_covers_the_worst_case_then_gives_back_the_rest() -> None:
    def go() -> None:
        leases, released, renewals = _leases()
        _busy(leases)
        leases.wanted(SHA)
        lease = leases.granted(SHA, "L1", P, 1 | 2 | 4, TS, 10, worst_micros=10, worst_tokens=100, taken=1)
        leases.answered(SHA)
        assert (lease.requests, lease.tokens, lease.micros, lease.reserved) == (9, 900, 90, 100)
        assert leases.take(SHA, 100, 100, MINUTE) is None  # a larger worst case than is left: to Redis
        taken = [leases.take(SHA, 10, 100, MINUTE) for _ in range(3)]
        assert all(t is lease for t in taken) and lease.inflight == 4
        assert leases.take(SHA, 10, 100, MINUTE + 1) is None  # the next minute: not this lease's window
        assert lease.closed and not released  # closed, but four requests are still in flight
        for _ in range(4):
            leases.settled(lease)
        [rel] = released
        assert rel.id == "L1" and rel.record is None and rel.key_state
        assert rel.reserved_micros == 100  # the whole lease's reservation is released at once
        assert rel.token_delta == -600 and rel.request_delta == -6  # the 6 requests it did not admit
        assert rel.minute == MINUTE
        assert not renewals

    _run(go)


def test_halfway_through_a_lease_the_next_one_is_asked_for() -> None:
    def go() -> None:
        leases, _, renewals = _leases()
        _busy(leases)
        leases.wanted(SHA)
        lease = leases.granted(SHA, "L1", P, 1, TS, 10, worst_micros=10, worst_tokens=100, taken=0)
        leases.answered(SHA)
        for _ in range(5):
            assert leases.take(SHA, 10, 100, MINUTE) is lease
        assert not renewals
        assert leases.take(SHA, 10, 100, MINUTE) is lease  # 4 left of 10: under half
        [(sha, old, n)] = renewals
        assert sha == SHA and old is lease and n > 1
        assert leases.take(SHA, 10, 100, MINUTE) is lease and len(renewals) == 1  # asked once
        new = leases.granted(SHA, "L2", P, 1, TS, 20, worst_micros=10, worst_tokens=100, taken=0)
        assert lease.closed and leases.take(SHA, 10, 100, MINUTE) is new

    _run(go)


def test_a_lease_of_one_is_closed_at_once_and_a_key_without_limits_books_no_release() -> None:
    def go() -> None:
        leases, released, _ = _leases()
        one = leases.granted(SHA, "L1", P, 1, TS, 1, worst_micros=10, worst_tokens=100, taken=1)
        assert one.closed
        leases.settled(one)
        assert [c.id for c in released] == ["L1"]
        free = leases.granted("b" * 64, "L2", Principal("acme", "user", "k2"), 0, TS, 10, 10, 100, taken=1)
        leases.close(free)
        leases.settled(free)
        assert [c.id for c in released] == ["L1"]  # no limits: nothing was counted or reserved

    _run(go)


def test_revoking_through_this_process_closes_the_keys_leases() -> None:
    def go() -> None:
        leases, released, _ = _leases()
        lease = leases.granted(SHA, "L1", P, 1, TS, 10, worst_micros=10, worst_tokens=100, taken=0)
        leases.close_key("k1")
        assert lease.closed and [c.id for c in released] == ["L1"]
        assert leases.take(SHA, 10, 100, MINUTE) is None

    _run(go)


def test_a_lease_ends_by_itself_when_its_time_is_up() -> None:
    async def go() -> None:
        leases, released, _ = _leases(seconds=0.05)
        lease = leases.granted(SHA, "L1", P, 1, TS, 10, worst_micros=10, worst_tokens=100, taken=0)
        await eventually_async(lambda: lease.closed, 2, "the lease's timer")
        assert [c.id for c in released] == ["L1"]

    asyncio.run(go())


def test_forgetting_idle_keys_keeps_those_with_a_lease_on_its_way(monkeypatch: Any) -> None:
    def go() -> None:
        monkeypatch.setattr("gateway.metering.lease.MAX_KEYS", 3)
        leases, _, _ = _leases()
        _busy(leases)
        assert leases.wanted(SHA) > 1
        waiting = leases.pending(SHA)
        for other in ("b", "c", "d", "e"):  # more keys than the process keeps
            leases.take(other * 64, 10, 100, MINUTE)
        assert leases.pending(SHA) is waiting  # still known: its answer reaches those waiting on it
        leases.answered(SHA)
        assert waiting is not None and waiting.is_set()

    _run(go)
