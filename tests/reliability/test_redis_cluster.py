"""Scale-out: `qlp gateway` processes sharing one real Redis Cluster (3 masters, a replica each).

* Metering on a cluster books every request exactly, and the ledger reads (per workflow, summary) see
  the records of keys whose slots live on different masters.
* Three gateway processes share one key's budget: the spend never passes it, whatever the interleaving,
  and every admitted request is booked once.
* The master holding a key's slot is killed (-9) under load from three processes and its replica takes
  over: every request answered 200 is booked exactly once (charges made during the failover are spooled
  and replayed), nothing is booked that no client received.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.metering import ledger_cli
from gateway.metering.layout import KeyKeys
from tests.fakes.redis_cluster import RedisClusterServer
from tests.fakes.upstream import FakeUpstream, Script
from tests.metered import ADMIN_KEY, MSG, auth, create_key, fleet, load_client, metric
from tests.metered import ledger_totals as key_totals
from tests.reliability.conftest import GatewayProcess
from tests.wait import eventually

BODY = {"model": "qlp-t0", "messages": MSG, "max_tokens": 100}  # worst case 100 micro-USD on T0


def ledger_totals(cluster: RedisClusterServer, key_id: str) -> dict[str, int]:
    """The key's day counters, summed (they all live on the master of the key's slot)."""
    c = cluster.client()
    try:
        return key_totals(c, key_id, target_nodes=c.get_node_from_key(KeyKeys(key_id).record))
    finally:
        c.close()


def stream_records(cluster: RedisClusterServer, key_id: str) -> list[dict[str, Any]]:
    c = cluster.client()
    try:
        return [orjson.loads(fields[b"r"]) for _, fields in c.xrange(KeyKeys(key_id).stream)]
    finally:
        c.close()


def _env(url: str, pricing_file: Path, **extra: str) -> dict[str, str]:
    return {
        "QLP_METERING": "true",
        "QLP_REDIS_URL": url,
        "QLP_PRICING": str(pricing_file),
        "QLP_ADMIN_KEY": ADMIN_KEY,
        **extra,
    }


def _three(
    gateway_process: Callable[..., GatewayProcess], upstreams: dict[str, FakeUpstream], env: dict[str, str]
) -> list[GatewayProcess]:
    return [gateway_process(fleet(upstreams), env=env, log_level="warning") for _ in range(3)]


def test_metering_on_a_cluster_books_every_request_and_reads_across_masters(
    metered, upstreams, cluster: RedisClusterServer, cluster_url: str
) -> None:
    keys = [create_key(cluster_url, f"tenant-{i}") for i in range(6)]
    masters = {cluster.master_of(KeyKeys(info.id).record).port for _, info in keys}
    assert len(masters) > 1, "every key landed on one master: the test would not read across nodes"
    gw = metered(redis_url=cluster_url)
    for i in range(30):
        key, _ = keys[i % len(keys)]
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json=BODY,
            headers={**auth(key), "X-QLP-Workflow-Id": f"wf-{i % len(keys)}"},
            timeout=20,
        )
        assert r.status_code == 200, r.text
    for _, info in keys:
        eventually(lambda info=info: ledger_totals(cluster, info.id)["req"] == 5, what=f"5 requests of {info.id}")
    # The ledger's reads: one workflow through its key, and the admin summary over every tenant.
    key0, _ = keys[0]
    doc = httpx.get(f"{gw.url}/v1/ledger/workflows/wf-0", headers=auth(key0), timeout=10).json()
    assert len(doc.get("records", ())) == 5, doc
    summary = httpx.get(
        f"{gw.url}/v1/ledger/summary", params={"group_by": "tenant"}, headers=auth(ADMIN_KEY), timeout=10
    )
    assert summary.status_code == 200, summary.text
    assert summary.json()["total"]["requests"] == 30
    assert {row["group"] for row in summary.json()["data"]} >= {f"tenant-{i}" for i in range(6)}
    # The CLI reads the same, and feedback finds a request by its id on whichever master holds its key.
    out = io.StringIO()
    assert ledger_cli.main(["--redis-url", cluster_url, "summary", "--by", "tenant", "--json"], out) == 0
    assert json.loads(out.getvalue())["total"]["requests"] == 30
    for key, _ in keys:
        r = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={**auth(key), "X-QLP-Workflow-Id": "fb"})
        fb = httpx.post(
            gw.url + "/v1/feedback",
            json={"request_id": r.headers["x-request-id"], "outcome": "success"},
            headers=auth(key),
            timeout=10,
        )
        assert fb.status_code == 200, fb.text
    report = httpx.get(gw.url + "/v1/report", headers=auth(key0), timeout=10)
    assert report.status_code == 200, report.text


def test_three_gateway_processes_never_spend_past_one_keys_budget(
    gateway_process, upstreams, cluster: RedisClusterServer, cluster_url: str, pricing_file: Path
) -> None:
    upstreams["a"].default = Script(completion_tokens=100, delay=0.05)  # T0: 100 micro-USD a request
    key, info = create_key(cluster_url, "acme", budget_day_micros=10 * 100)  # worth 10 requests
    gws = _three(gateway_process, upstreams, _env(cluster_url, pricing_file))

    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=96)) as c:
            return await asyncio.gather(
                *(c.post(gws[i % 3].url + "/v1/chat/completions", json=BODY, headers=auth(key)) for i in range(n))
            )

    first = asyncio.run(burst(60))
    ok = sum(r.status_code == 200 for r in first)
    assert {r.status_code for r in first} <= {200, 429} and ok <= 10
    # Reservations held by leases and requests in flight come back; then the rest of the budget is usable
    # to the last request, from any process, and not one request more.
    for _ in range(200):
        if ok == 10:
            break
        r = httpx.post(gws[ok % 3].url + "/v1/chat/completions", json=BODY, headers=auth(key), timeout=20)
        if r.status_code == 200:
            ok += 1
        else:
            assert r.status_code == 429 and r.headers["retry-after"], r.text
            threading.Event().wait(0.05)
    assert ok == 10
    assert all(
        httpx.post(g.url + "/v1/chat/completions", json=BODY, headers=auth(key), timeout=20).status_code == 429
        for g in gws
    )
    assert len(upstreams["a"].requests) == 10
    eventually(lambda: ledger_totals(cluster, info.id) == {"req": 10, "pt": 10 * 5, "ct": 1000, "cost": 1000},
               what="10 requests and 1000 micro-USD booked")  # fmt: skip


def test_a_master_killed_under_load_fails_over_and_the_ledger_stays_exact(
    gateway_process, upstreams, cluster: RedisClusterServer, cluster_url: str, pricing_file: Path
) -> None:
    requests, clients, kill_at = 180, 6, 50
    key, info = create_key(cluster_url, "load")
    env = _env(
        cluster_url,
        pricing_file,
        QLP_ADMISSION_WHEN_REDIS_DOWN="open",
        QLP_SPOOL_REPLAY_INTERVAL="0.05",
        QLP_FAIL_OPEN_CAP="100000",
        QLP_REDIS_TIMEOUT="0.5",
        QLP_REDIS_WAIT_REPLICAS="1",  # a charge counts once its replica holds it: the failover cannot lose it
    )
    gws = _three(gateway_process, upstreams, env)
    usage = [(7 + i % 13, 1 + i % 9) for i in range(requests)]
    upstreams["a"].push(*(Script(prompt_tokens=p, completion_tokens=c, n_chunks=3, chunk_delay=0.01) for p, c in usage))
    one, done = load_client(lambda i: gws[i % 3].url, key)

    victim = cluster.master_of(KeyKeys(info.id).record)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [pool.submit(one, i) for i in range(requests)]
        eventually(lambda: done() >= kill_at, timeout=60, what=f"{kill_at} requests")
        victim.kill()
        statuses = [f.result() for f in results]
    cluster.wait_ok()
    # As a StatefulSet would, the killed node comes back: as the new master's replica. Until then charges
    # wait in the spools (WAIT 1 cannot be met by a master without replicas).
    victim.start()
    cluster.wait_ok(replicated=True)
    assert statuses == [200] * requests
    assert not upstreams["a"].scripts  # each request reached the upstream exactly once
    expected = {
        "req": requests,
        "pt": sum(p for p, _ in usage),
        "ct": sum(c for _, c in usage),
        "cost": sum(c for _, c in usage),
    }
    eventually(lambda: ledger_totals(cluster, info.id) == expected, timeout=60,
               what=f"the ledger to equal the upstream's usage {expected}")  # fmt: skip
    for g in gws:
        eventually(lambda g=g: httpx.get(g.url + "/readyz").json()["ledger"]["spool_depth"] == 0,
                   what="every spool replayed")  # fmt: skip
    records = stream_records(cluster, info.id)
    assert len(records) == requests and len({r["id"] for r in records}) == requests
    # The failover was felt: admissions decided without Redis while the slot had no master.
    assert sum(metric(g.url, "qlp_admissions_total", how="without_redis") for g in gws) > 0
