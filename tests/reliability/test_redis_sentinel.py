"""Redis under Sentinel: the master killed (-9) under load, the replica promoted, the gateway follows it.

Both of the gateway's clients ask the Sentinels where the master is (`redis+sentinel://`). During the
failover admissions fail open for known keys and charges are spooled; with `QLP_REDIS_WAIT_REPLICAS=1` a
charge counts only once the replica holds it, so the promotion cannot lose one. At the end the ledger
equals what the upstream served, and each request is booked once.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.metering.layout import KeyKeys
from tests.fakes.redis_sentinel import SentinelSet
from tests.fakes.upstream import Script
from tests.metered import create_key, ledger_totals, load_client
from tests.wait import eventually

REQUESTS, CLIENTS, KILL_AT = 160, 6, 40


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path / "sentinel").start()
    yield s
    s.stop()


def test_a_sentinel_failover_under_load_keeps_the_ledger_exact(metered, upstreams, sentinel: SentinelSet) -> None:
    key, info = create_key(sentinel.url, "load")
    gw = metered(
        redis_url=sentinel.url,
        admission_when_redis_down="open",
        spool_replay_interval=0.05,
        fail_open_cap=100_000,
        redis_timeout=0.5,
        redis_wait_replicas=1,
    )
    usage = [(7 + i % 13, 1 + i % 9) for i in range(REQUESTS)]
    upstreams["a"].push(*(Script(prompt_tokens=p, completion_tokens=c, n_chunks=3, chunk_delay=0.01) for p, c in usage))
    one, done = load_client(lambda i: gw.url, key)

    old = sentinel.master()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = [pool.submit(one, i) for i in range(REQUESTS)]
        eventually(lambda: done() >= KILL_AT, timeout=60, what=f"{KILL_AT} requests")
        old.kill()
        statuses = [f.result() for f in results]
    assert statuses == [200] * REQUESTS, sorted(set(statuses))
    eventually(lambda: sentinel.master() is not old, timeout=30, what="the replica's promotion")
    old.start()  # back as the new master's replica: WAIT 1 can be met again
    sentinel.wait_ok(timeout=60)
    expected = {"req": REQUESTS, "pt": sum(p for p, _ in usage), "ct": sum(c for _, c in usage),
                "cost": sum(c for _, c in usage)}  # fmt: skip
    eventually(
        lambda: ledger_totals(sentinel.client(), info.id) == expected,
        timeout=60,
        what=f"the ledger to equal {expected}",
    )
    with sentinel.client() as c:
        records = [orjson.loads(f[b"r"]) for _, f in c.xrange(KeyKeys(info.id).stream)]
    assert len(records) == REQUESTS and len({r["id"] for r in records}) == REQUESTS
