"""The gateway at scale: 1, 2 and 4 worker processes, and 1,000 concurrent SSE streams.

    python -m bench bench_scale        (part of `make bench`)
    QLP_BENCH_SECONDS=2 QLP_BENCH_ROUNDS=1 QLP_BENCH_STREAMS=200 python -m bench bench_scale

Both parts run the gateway as the product runs it: API-key auth, routing over two weighted backends, Redis
metering and metrics (bench_litellm.metering).

  * Workers: `qlp gateway --workers N` for N in 1, 2, 4 (QLP_BENCH_WORKERS) against the nginx mock, wrk at
    32 and 256 connections (QLP_BENCH_SCALE_CONNECTIONS), the three gateways interleaved per round; requests/s
    and CPU per request of the gateway's process tree. wrk, nginx, Redis and the workers share this machine's
    cores: with 2 cores, 4 workers is oversubscribed and shows what that costs, not how the gateway scales on
    a bigger host.
  * Streaming: QLP_BENCH_STREAMS (1,000) SSE streams opened at once through the gateway (QLP_BENCH_STREAM_WORKERS,
    default 1) from a mock that emits QLP_BENCH_STREAM_CHUNKS (20) chunks every QLP_BENCH_STREAM_INTERVAL
    (0.05) s; the same streams straight to the mock are the baseline, interleaved. Added time to first byte
    p50/p99 (TTFT: the mock sends its first token at once), inter-chunk delay p50/p99 through the gateway and
    direct, and streams dropped (closed without `data: [DONE]`; target: none).
Environment also: QLP_BENCH_SECONDS (8 per wrk run), QLP_BENCH_ROUNDS (2), QLP_BENCH_WRK_THREADS (1).
Results: bench/results/bench_scale.{json,md,png}.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import uvloop

from bench.bench_litellm import metering, root_pid, routed_config
from bench.harness import (
    cpu_seconds,
    gateway,
    machine_note,
    median,
    nginx_mock,
    raise_nofile,
    rss_mb,
    stream_mock,
    stream_ttfb,
    write_results,
    wrk,
)

ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
DURATION = int(os.environ.get("QLP_BENCH_SECONDS", "8"))
WORKERS = [int(w) for w in os.environ.get("QLP_BENCH_WORKERS", "1,2,4").split(",")]
CONNECTIONS = [int(c) for c in os.environ.get("QLP_BENCH_SCALE_CONNECTIONS", "32,256").split(",")]
THREADS = int(os.environ.get("QLP_BENCH_WRK_THREADS", "1"))
STREAMS = int(os.environ.get("QLP_BENCH_STREAMS", "1000"))
STREAM_WORKERS = int(os.environ.get("QLP_BENCH_STREAM_WORKERS", "1"))
STREAM_CHUNKS = int(os.environ.get("QLP_BENCH_STREAM_CHUNKS", "20"))
STREAM_INTERVAL = float(os.environ.get("QLP_BENCH_STREAM_INTERVAL", "0.05"))


def scaling() -> dict[str, Any]:
    runs: dict[int, dict[int, list[dict[str, float]]]] = {w: {c: [] for c in CONNECTIONS} for w in WORKERS}
    rss: dict[int, float] = {}
    with nginx_mock() as upstream, metering() as (on_env, key):
        auth = {"QLP_BENCH_KEY": key}
        with contextlib.ExitStack() as stack:
            gws = {
                w: stack.enter_context(gateway(upstream, workers=w, env=on_env, config=routed_config(upstream)))
                for w in WORKERS
            }
            pids = {w: root_pid(url) for w, url in gws.items()}
            for url in gws.values():  # warm-up: every worker's pools (the kernel spreads connections)
                wrk(url + "/v1/chat/completions", 64, 2, threads=THREADS, env=auth)
            for _ in range(ROUNDS):
                for c in CONNECTIONS:
                    for w in WORKERS:
                        before = cpu_seconds(pids[w])
                        r = wrk(gws[w] + "/v1/chat/completions", c, DURATION, threads=THREADS, env=auth)
                        r["cpu_per_req"] = (cpu_seconds(pids[w]) - before) / max(r["requests"], 1.0)
                        runs[w][c].append(r)
            rss = {w: rss_mb(p) for w, p in pids.items()}
    out: dict[str, Any] = {}
    for w in WORKERS:
        out[str(w)] = {"rss_mb": rss[w]}
        for c in CONNECTIONS:
            rs = runs[w][c]
            out[str(w)][str(c)] = {
                "rps": median([r["rps"] for r in rs]),
                "p50": median([r["p50"] for r in rs]),
                "p99": median([r["p99"] for r in rs]),
                "cpu_per_req": median([r["cpu_per_req"] for r in rs]),
                "non2xx": sum(r["non2xx"] + r["errors"] for r in rs),
            }
    return {"workers": out, "runs": {str(w): {str(c): v for c, v in d.items()} for w, d in runs.items()}}


def streaming() -> dict[str, Any]:
    limit = raise_nofile(max(4 * STREAMS + 1024, 8192))  # client + gateway (+ its upstream sockets) + mock
    with stream_mock(STREAM_CHUNKS, STREAM_INTERVAL) as upstream, metering() as (on_env, key):
        with gateway(upstream, workers=STREAM_WORKERS, env=on_env, config=routed_config(upstream)) as gw:
            direct, via = upstream + "/chat/completions", gw + "/v1/chat/completions"
            auth = {"Authorization": f"Bearer {key}"}
            # Warm-up at full width, so both sides measure kept-alive upstream connections.
            uvloop.run(stream_ttfb(via, STREAMS, auth))
            uvloop.run(stream_ttfb(direct, STREAMS))
            d_runs, g_runs = [], []
            for _ in range(ROUNDS):
                d_runs.append(uvloop.run(stream_ttfb(direct, STREAMS)))
                g_runs.append(uvloop.run(stream_ttfb(via, STREAMS, auth)))

    def med(rs: list[dict[str, float]], f: str) -> float:
        return median([r[f] for r in rs])

    fields = ("ttfb_p50", "ttfb_p99", "gap_p50", "gap_p99")
    d = {f: med(d_runs, f) for f in fields}
    g = {f: med(g_runs, f) for f in fields}
    return {
        "streams": STREAMS,
        "workers": STREAM_WORKERS,
        "chunks": STREAM_CHUNKS,
        "interval_s": STREAM_INTERVAL,
        "nofile": limit,
        "direct": d,
        "gateway": g,
        "added": {f: g[f] - d[f] for f in fields},
        "dropped": sum(r["dropped"] for r in g_runs),
        "dropped_direct": sum(r["dropped"] for r in d_runs),
        "completed": sum(r["n"] for r in g_runs),
        "runs": {"direct": d_runs, "gateway": g_runs},
    }


def table(sc: dict[str, Any], st: dict[str, Any], note: str) -> str:
    lines = [
        "# Gateway at scale (metering, auth, routing and metrics on)",
        "",
        f"Machine: {note}. Medians of {ROUNDS} interleaved rounds, wrk {DURATION} s per run.",
        "",
        "| workers | "
        + " | ".join(f"req/s at {c}" for c in CONNECTIONS)
        + " | "
        + " | ".join(f"CPU/req at {c}" for c in CONNECTIONS)
        + " | RSS |",
        "|---:|" + "---:|" * (2 * len(CONNECTIONS) + 1),
    ]
    for w, row in sc["workers"].items():
        lines.append(
            f"| {w} | "
            + " | ".join(f"{row[str(c)]['rps']:,.0f}" for c in CONNECTIONS)
            + " | "
            + " | ".join(f"{row[str(c)]['cpu_per_req'] * 1e6:,.0f} us" for c in CONNECTIONS)
            + f" | {row['rss_mb']:.0f} MiB |"
        )
    cores = os.cpu_count() or 0
    if any(w > cores for w in WORKERS):
        lines += [
            "",
            f"This machine has {cores} cores, shared by wrk, nginx, Redis and the gateway: workers beyond "
            "that are oversubscribed (context switches, not parallelism).",
        ]
    a, d, g = st["added"], st["direct"], st["gateway"]
    lines += [
        "",
        f"## {st['streams']:,} concurrent SSE streams ({st['workers']} gateway worker(s); mock: "
        f"{st['chunks']} chunks every {st['interval_s'] * 1e3:.0f} ms)",
        "",
        "| | TTFT p50 | TTFT p99 | inter-chunk p50 | inter-chunk p99 |",
        "|---|---:|---:|---:|---:|",
        f"| mock alone | {d['ttfb_p50'] * 1e3:.1f} ms | {d['ttfb_p99'] * 1e3:.1f} ms "
        f"| {d['gap_p50'] * 1e3:.1f} ms | {d['gap_p99'] * 1e3:.1f} ms |",
        f"| through the gateway | {g['ttfb_p50'] * 1e3:.1f} ms | {g['ttfb_p99'] * 1e3:.1f} ms "
        f"| {g['gap_p50'] * 1e3:.1f} ms | {g['gap_p99'] * 1e3:.1f} ms |",
        f"| added by the gateway | {a['ttfb_p50'] * 1e3:+.1f} ms | {a['ttfb_p99'] * 1e3:+.1f} ms "
        f"| {a['gap_p50'] * 1e3:+.1f} ms | {a['gap_p99'] * 1e3:+.1f} ms |",
        "",
        f"Streams dropped through the gateway: {st['dropped']:.0f} of {st['completed'] + st['dropped']:.0f} "
        f"(mock alone: {st['dropped_direct']:.0f}); target: none.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    sc = scaling()
    st = streaming()
    note = machine_note()
    out = table(sc, st, note)
    print(out)
    write_results(
        "bench_scale",
        {
            "machine": note,
            "rounds": ROUNDS,
            "seconds": DURATION,
            "connections": CONNECTIONS,
            "scaling": sc,
            "streaming": st,
        },
        out,
    )
    return 1 if st["dropped"] else 0
