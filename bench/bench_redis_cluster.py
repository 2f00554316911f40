"""Metered requests/s with 1, 2 and 3 gateway processes on one Redis Cluster, against one Redis server.

    python -m bench bench_redis_cluster        (part of `make bench`)
    QLP_BENCH_SECONDS=2 QLP_BENCH_ROUNDS=1 python -m bench bench_redis_cluster

Set-ups side by side, one API key each (every limit set, out of reach): a single redis-server, and a Redis
Cluster of 3 masters with a replica each (tests/fakes/redis_cluster.py), without and with
`QLP_REDIS_WAIT_REPLICAS=1`. For N gateway processes (`qlp gateway`, one worker each) N wrk runs go at once,
one per process, 32 connections in all, against the nginx mock; requests/s is their sum. Then the added
latency at 1 connection, p50/p99, of one gateway on each Redis, and of one with metering off, against
the mock alone. Rounds interleave the
set-ups. Everything shares this machine's cores: with 2 cores, more processes compete for the same CPU, so
the figures show what the cluster costs against one server, not how far the fleet scales on more cores.
Environment: QLP_BENCH_SECONDS (6 per wrk run), QLP_BENCH_ROUNDS (2), QLP_BENCH_PROCESSES (1,2,3).
Results: bench/results/bench_redis_cluster.{json,md}.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.bench_metering import PRICING, _create_key, redis_server
from bench.harness import gateway, machine_note, median, ms, nginx_mock, write_results, wrk
from tests.fakes.redis_cluster import RedisClusterServer

DURATION = int(os.environ.get("QLP_BENCH_SECONDS", "6"))
ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
PROCESSES = [int(n) for n in os.environ.get("QLP_BENCH_PROCESSES", "1,2,3").split(",")]
CONNECTIONS = 32


@contextlib.contextmanager
def gateways(upstream: str, env: dict[str, str], n: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(gateway(upstream, env=env)) for _ in range(n)]


def together(urls: list[str], key: str) -> float:
    """requests/s of wrk runs at once, one per gateway, CONNECTIONS in all."""
    per = max(1, CONNECTIONS // len(urls))
    env = {"QLP_BENCH_KEY": key}
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        runs = list(pool.map(lambda u: wrk(u + "/v1/chat/completions", per, DURATION, env=env), urls))
    assert all(r["non2xx"] == 0 for r in runs), runs
    return sum(r["rps"] for r in runs)


def main(argv: list[str]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="qlp-bench-cluster-"))
    pricing = tmp / "pricing.yaml"
    pricing.write_text(yaml.safe_dump(PRICING))
    cluster = RedisClusterServer(tmp / "cluster").start()
    try:
        with nginx_mock() as upstream, redis_server() as (single_url, _):
            urls = {"single": single_url, "cluster": cluster.url, "cluster+wait": cluster.url}
            keys = {name: asyncio.run(_create_key(url)) for name, url in urls.items()}

            def env(name: str) -> dict[str, str]:
                return {
                    "QLP_METERING": "true",
                    "QLP_REDIS_URL": urls[name],
                    "QLP_PRICING": str(pricing),
                    "QLP_SPOOL_PATH": str(tmp / name / "spool.jsonl"),
                    "QLP_REDIS_WAIT_REPLICAS": "1" if name.endswith("wait") else "0",
                }

            rps: dict[str, dict[int, list[float]]] = {name: {n: [] for n in PROCESSES} for name in urls}
            for r in range(ROUNDS):
                for n in PROCESSES:
                    order = list(urls) if r % 2 == 0 else list(reversed(urls))
                    for name in order:
                        with gateways(upstream, env(name), n) as gws:
                            together(gws, keys[name])  # warm-up
                            rps[name][n].append(together(gws, keys[name]))
                            print(f"bench_redis_cluster: {name} x{n}: {rps[name][n][-1]:,.0f} req/s", flush=True)
            # The same gateway with metering off: what the topologies add beyond the gateway itself.
            lat: dict[str, dict[str, list[float]]] = {n: {"p50": [], "p99": []} for n in [*urls, "off", "direct"]}
            with contextlib.ExitStack() as stack:
                one = {name: stack.enter_context(gateway(upstream, env=env(name))) for name in urls}
                one["off"] = stack.enter_context(gateway(upstream, env={"QLP_METERING": "false"}))
                for name, url in one.items():
                    wrk(url + "/v1/chat/completions", 1, 2, env={"QLP_BENCH_KEY": keys.get(name, "")})
                for _ in range(ROUNDS):
                    d = wrk(upstream + "/chat/completions", 1, DURATION)
                    lat["direct"]["p50"].append(d["p50"])
                    lat["direct"]["p99"].append(d["p99"])
                    for name, url in one.items():
                        g = wrk(url + "/v1/chat/completions", 1, DURATION, env={"QLP_BENCH_KEY": keys.get(name, "")})
                        lat[name]["p50"].append(g["p50"])
                        lat[name]["p99"].append(g["p99"])
    finally:
        cluster.stop()
    res: dict[str, Any] = {
        "rps": {name: {str(n): median(v) for n, v in per.items()} for name, per in rps.items()},
        "latency_s": {name: {p: median(v) for p, v in d.items()} for name, d in lat.items()},
    }
    base = res["rps"]["single"]
    lines = [
        "# Metered gateway processes on one Redis Cluster vs one Redis server",
        "",
        f"Machine: {machine_note()}. {CONNECTIONS} connections in all, nginx mock upstream, medians of {ROUNDS} "
        f"rounds of {DURATION} s.",
        "",
        "| Redis | " + " | ".join(f"{n} process{'es' if n > 1 else ''} req/s" for n in PROCESSES) + " |",
        "|---|" + "---:|" * len(PROCESSES),
    ]
    for name, per in res["rps"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{per[str(n)]:,.0f} ({per[str(n)] / base[str(n)]:.2f}x)" for n in PROCESSES)
            + " |"
        )
    d = res["latency_s"]["direct"]
    lines += ["", "| Redis | added p50 at 1 connection | added p99 |", "|---|---:|---:|"]
    for name in [*urls, "off"]:
        g = res["latency_s"][name]
        lines.append(f"| {name} | {ms(g['p50'] - d['p50'])} | {ms(g['p99'] - d['p99'])} |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("bench_redis_cluster", {"machine": machine_note(), **res}, table)
    return 0
