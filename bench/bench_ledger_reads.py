"""The ledger's reads at a million records, on one Redis server and on a Redis Cluster, side by side.

    python -m bench bench_ledger_reads        (part of `make bench`: ~2 minutes, ~0.6 GB of Redis memory)
    QLP_BENCH_LEDGER_RECORDS=100000 python -m bench bench_ledger_reads

For each Redis (a redis-server; a cluster of 3 masters without replicas, tests/fakes/redis_cluster.py): one
tenant with 8 API keys, QLP_BENCH_LEDGER_RECORDS (1,000,000) charges booked today through the CHARGE script
(the request path's pipe, batches of 500), in workflows of 100 requests. Then the reads the API and `qlp
ledger` make, timed: the day's summary by tier and by workflow (counters, not records), one workflow with its
100 records, and the export of every record (streams, in pages). Redis memory after booking.
Results: bench/results/bench_ledger_reads.{json,md}.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_metering import redis_server
from bench.harness import machine_note, write_results
from gateway.metering import reader
from gateway.metering.cluster import open_pipe
from gateway.metering.keys import KeyStore
from gateway.metering.ledger import SEP, Charge, Ledger, LedgerPolicy
from gateway.metering.meter import connect
from gateway.settings import Settings
from tests.fakes.redis_cluster import RedisClusterServer

RECORDS = int(os.environ.get("QLP_BENCH_LEDGER_RECORDS", "1000000"))
KEYS, PER_WORKFLOW, BATCH, PARALLEL = 8, 100, 500, 8


def _charge(i: int, key_id: str, now: int) -> Charge:
    wf = f"wf-{i // PER_WORKFLOW}"
    rec = {"id": f"c{i}", "ts": now, "tenant": "acme", "workflow": wf, "tier": "T0", "model": "m0",
           "prompt_tokens": 20 + i % 50, "completion_tokens": 10 + i % 30, "cost_micros": 10 + i % 30,
           "reference_cost_micros": 2000, "estimated": False, "request_id": f"r{i}"}  # fmt: skip
    return Charge(f"c{i}", now, "acme", key_id, cost_micros=rec["cost_micros"], minute=now // 60_000, record=rec,
                  group=SEP.join(["T0", "a/m0", "", wf]))  # fmt: skip


async def _run(url: str) -> dict[str, Any]:
    redis = connect(Settings(redis_url=url))
    store = KeyStore(redis)
    key_ids = [(await store.create("acme"))[1].id for _ in range(KEYS)]
    pipe = open_pipe(url, 30.0)
    ledger = Ledger(pipe, LedgerPolicy(stream_maxlen=10 * RECORDS))
    await ledger.load_scripts()
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(PARALLEL)

    async def book(lo: int) -> None:
        async with sem:
            # a workflow's requests come from one key: records of wf-N all live in one slot
            batch = [_charge(i, key_ids[(i // PER_WORKFLOW) % KEYS], now) for i in range(lo, min(lo + BATCH, RECORDS))]
            assert all(r == 1 for r in await ledger.apply(batch))

    await asyncio.gather(*(book(lo) for lo in range(0, RECORDS, BATCH)))
    out: dict[str, Any] = {"book_s": time.perf_counter() - t0}
    day = dt.datetime.fromtimestamp(now / 1000, dt.UTC).date()

    async def timed(name: str, coro: Any) -> Any:
        t = time.perf_counter()
        value = await coro
        out[name] = time.perf_counter() - t
        return value

    s = await timed("summary_tier_s", reader.summary(redis, ["acme"], "tier", day, day))
    assert s["total"]["requests"] == RECORDS, s["total"]
    w = await timed("summary_workflow_s", reader.summary(redis, ["acme"], "workflow", day, day))
    out["workflows"] = len(w["data"])
    one = await timed("workflow_s", reader.workflow(redis, "acme", "wf-7"))
    assert one is not None and len(one["records"]) == PER_WORKFLOW

    async def count() -> int:
        return sum([1 async for _ in reader.export(redis, ["acme"], day, day)])

    out["exported"] = await timed("export_s", count())
    assert out["exported"] == RECORDS
    out["redis_mib"] = 0.0
    if "+cluster" in url:
        info = await redis.info("memory", target_nodes="primaries")  # type: ignore[call-arg]
        out["redis_mib"] = sum(v["used_memory"] for v in info.values()) / 2**20
    else:
        out["redis_mib"] = (await redis.info("memory"))["used_memory"] / 2**20
    pipe.close()
    await redis.aclose()
    return out


def main(argv: list[str]) -> int:
    res: dict[str, Any] = {}
    with redis_server() as (single, _):
        print(f"bench_ledger_reads: {RECORDS:,} records on one Redis server", flush=True)
        res["single"] = asyncio.run(_run(single))
    tmp = Path(tempfile.mkdtemp(prefix="qlp-bench-ledger-"))
    cluster = RedisClusterServer(tmp / "cluster", replicas=0).start()
    try:
        print(f"bench_ledger_reads: {RECORDS:,} records on a 3-master cluster", flush=True)
        res["cluster"] = asyncio.run(_run(cluster.url))
    finally:
        cluster.stop()
    lines = [
        f"# Ledger reads at {RECORDS:,} records",
        "",
        f"Machine: {machine_note()}. One tenant, {KEYS} keys, workflows of {PER_WORKFLOW} requests, all today.",
        "",
        "| Redis | book (charges/s) | summary by tier | summary by workflow | one workflow | export all "
        "(records/s) | Redis memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | {r['book_s']:.1f} s ({RECORDS / r['book_s']:,.0f}) | {r['summary_tier_s'] * 1e3:.1f} ms | "
            f"{r['summary_workflow_s'] * 1e3:.0f} ms ({r['workflows']:,} rows) | {r['workflow_s'] * 1e3:.1f} ms | "
            f"{r['export_s']:.1f} s ({RECORDS / r['export_s']:,.0f}) | {r['redis_mib']:,.0f} MiB |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("bench_ledger_reads", {"machine": machine_note(), "records": RECORDS, **res}, table)
    return 0
