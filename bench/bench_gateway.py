"""Gateway throughput and added latency against a mock upstream, the upstream alone as the baseline.

    python -m bench bench_gateway        (part of `make bench`)

Figures (one gateway worker, this machine):
  * requests/s at 32 connections through the gateway (nginx mock upstream; wrk)
  * added latency p50/p99 at 1 connection: gateway minus the upstream alone, same run
  * streaming: added time to first byte with 200 concurrent streams (aiohttp mock emitting 20 chunks)
Runs are interleaved (direct, gateway, direct, gateway) and the medians reported.
"""

from __future__ import annotations

import asyncio
import os

from bench.harness import gateway, median, ms, nginx_mock, stream_mock, stream_ttfb, wrk

ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
DURATION = int(os.environ.get("QLP_BENCH_SECONDS", "8"))


def main(argv: list[str]) -> int:
    with nginx_mock() as upstream, gateway(upstream) as gw:
        direct = upstream + "/chat/completions"
        via = gw + "/v1/chat/completions"
        wrk(via, 32, 2)  # warm-up
        rps_d, rps_g, p50_d, p50_g, p99_d, p99_g = [], [], [], [], [], []
        for _ in range(ROUNDS):
            rps_d.append(wrk(direct, 32, DURATION)["rps"])
            g = wrk(via, 32, DURATION)
            assert g["non2xx"] == 0, g
            rps_g.append(g["rps"])
            d1, g1 = wrk(direct, 1, DURATION), wrk(via, 1, DURATION)
            p50_d.append(d1["p50"])
            p50_g.append(g1["p50"])
            p99_d.append(d1["p99"])
            p99_g.append(g1["p99"])
    print(
        f"non-streaming, 32 connections: gateway {median(rps_g):,.0f} req/s "
        f"(upstream alone {median(rps_d):,.0f} req/s; target >= 4,000)"
    )
    print(
        f"added latency, 1 connection: p50 {ms(median(p50_g) - median(p50_d))} (target <= 0.4 ms), "
        f"p99 {ms(median(p99_g) - median(p99_d))} (target <= 2 ms); "
        f"gateway p50 {ms(median(p50_g))} p99 {ms(median(p99_g))}, upstream p50 {ms(median(p50_d))} p99 {ms(median(p99_d))}"
    )

    with stream_mock() as upstream, gateway(upstream) as gw:
        # Warm-up at full width, so both sides measure kept-alive upstream connections.
        asyncio.run(stream_ttfb(gw + "/v1/chat/completions", 200))
        asyncio.run(stream_ttfb(upstream + "/chat/completions", 200))
        d = asyncio.run(stream_ttfb(upstream + "/chat/completions", 200))
        g = asyncio.run(stream_ttfb(gw + "/v1/chat/completions", 200))
    print(
        f"streaming, 200 concurrent: added TTFB p50 {ms(g['ttfb_p50'] - d['ttfb_p50'])} "
        f"p99 {ms(g['ttfb_p99'] - d['ttfb_p99'])} (gateway p50 {ms(g['ttfb_p50'])}, upstream p50 {ms(d['ttfb_p50'])}); "
        f"inter-chunk p50 {ms(g['gap_p50'])} vs {ms(d['gap_p50'])}; dropped {g['dropped']:.0f}/{g['n'] + g['dropped']:.0f}"
    )
    return 0
