"""Redis SIGKILLed under load and restarted: no request is lost from the ledger, none is counted twice.

Eight clients keep streaming and non-streaming requests going while the real redis-server dies (kill -9)
and comes back on the same port with its append-only file. Admission fails open for known keys, charges
made meanwhile go to the spool and are replayed. At the end the ledger equals, token for token and
micro-dollar for micro-dollar, what the upstream reported; then the outage's spool is replayed a second
time on purpose, and nothing moves.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import orjson

from gateway.metering.layout import KeyKeys
from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import Script
from tests.metered import ledger_totals, load_client
from tests.reliability.conftest import create_key
from tests.wait import eventually

REQUESTS = 240
CLIENTS = 8
KILL_AT, RESTART_AT = 80, 160  # completed requests


def test_redis_killed_under_load_loses_nothing_and_counts_nothing_twice(
    metered, upstreams, private_redis: RedisServer, tmp_path: Path
) -> None:
    server = private_redis
    key, info = create_key(server.url, "load")
    gw = metered(
        redis_url=server.url, admission_when_redis_down="open", spool_replay_interval=0.05, fail_open_cap=100_000
    )
    usage = [(7 + i % 13, 1 + i % 9) for i in range(REQUESTS)]  # (prompt, completion) the upstream reports
    upstreams["a"].push(*(Script(prompt_tokens=p, completion_tokens=c, n_chunks=4, chunk_delay=0.01) for p, c in usage))
    one, done = load_client(lambda i: gw.url, key)

    spool = tmp_path / "spool" / "ledger.jsonl"
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = [pool.submit(one, i) for i in range(REQUESTS)]
        eventually(lambda: done() >= KILL_AT, timeout=60, what=f"{KILL_AT} requests")
        server.kill()
        eventually(lambda: done() >= RESTART_AT, timeout=60, what=f"{RESTART_AT} requests")
        # What the outage spooled so far (complete lines), to replay a second time at the end.
        spooled = [line for line in spool.read_bytes().split(b"\n")[:-1] if line] if spool.exists() else []
        server.start()
        statuses = [f.result() for f in results]
    assert statuses == [200] * REQUESTS
    assert not upstreams["a"].scripts  # each request reached the upstream exactly once
    expected = {
        "req": REQUESTS,
        "pt": sum(p for p, _ in usage),
        "ct": sum(c for _, c in usage),
        "cost": sum(c for _, c in usage),
    }  # T0: 1 micro-USD per output token
    eventually(
        lambda: ledger_totals(server.client(), info.id) == expected,
        timeout=30,
        what=f"the ledger to equal the upstream's usage {expected}",
    )
    eventually(lambda: httpx.get(gw.url + "/readyz").json()["ledger"]["spool_depth"] == 0, what="an empty spool")
    assert spooled, "nothing was spooled during the outage: the test did not test the outage"
    # Replay the outage's charges again (a replay interrupted after Redis applied them, say): no change.
    with spool.open("ab") as f:
        f.write(b"".join(line + b"\n" for line in spooled))
    eventually(lambda: httpx.get(gw.url + "/readyz").json()["ledger"]["spool_depth"] == 0, what="the second replay")
    assert ledger_totals(server.client(), info.id) == expected
    with server.client() as c:
        records = [orjson.loads(fields[b"r"]) for _, fields in c.xrange(KeyKeys(info.id).stream)]
    assert len(records) == REQUESTS and len({r["id"] for r in records}) == REQUESTS
    print(
        f"redis kill under load: {REQUESTS} requests held, {len(spooled)} charges spooled and replayed twice, "
        f"ledger == upstream usage {expected}"
    )
