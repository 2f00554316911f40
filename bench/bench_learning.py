"""What the learning loop costs on the request path: the metered gateway with a rollout (two arms, sticky per
workflow) and with capture on (every request of the agent captured, redacted, written to Redis), against
the same metered gateway without either, same run, same mock upstream, same Redis, same client script.

    python -m bench bench_learning        (part of `make bench`)

Figures (one gateway worker each; wrk sends X-QLP-Agent and one of 1,000 workflow ids per request):
  * requests/s at 32 connections per configuration, and the ratio to the plain metered gateway
  * CPU per request of the gateway process and of Redis
  * how many records the capture wrote (it must have captured, or the figure means nothing)
Runs are interleaved and the medians reported.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from bench.bench_metering import _measured, gateway_pid, metered_setup
from bench.harness import fleet_config, gateway, median, wrk

ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
ROLLOUT = {
    "T0/developer": {
        "arms": [
            {"name": "v1", "adapter": "bench-v1", "weight": 50},
            {"name": "v2", "adapter": "bench-v2", "weight": 50},
        ]
    }
}
CAPTURE = {"targets": {"T0": ["developer"]}}


async def _captured(url: str) -> int:
    from redis.asyncio import Redis

    r = Redis.from_url(url)
    try:
        return int(await r.xlen("qlp:capture:developer"))
    finally:
        await r.aclose()


def main(argv: list[str]) -> int:
    with metered_setup("qlp-bench-learning-") as m:
        upstream, redis_pid, env = m.upstream, m.redis_pid, m.env
        client = {"QLP_BENCH_KEY": m.key, "QLP_BENCH_AGENT": "developer"}
        configs: dict[str, dict[str, Any]] = {
            "plain": fleet_config(upstream),
            "rollout": fleet_config(upstream, rollouts=ROLLOUT),
            "capture": fleet_config(upstream, capture=CAPTURE),
        }
        with (
            gateway(upstream, env=env, config=configs["plain"]) as plain,
            gateway(upstream, env=env, config=configs["rollout"]) as rollout,
            gateway(upstream, env=env, config=configs["capture"]) as capture,
        ):
            urls = {"plain": plain, "rollout": rollout, "capture": capture}
            pids = {n: gateway_pid(u) for n, u in urls.items()}
            for u in urls.values():  # warm-up
                wrk(u + "/v1/chat/completions", 32, 2, env=client)
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in urls}
            for _ in range(ROUNDS):
                for n, u in urls.items():
                    runs[n].append(_measured(u + "/v1/chat/completions", 32, [pids[n], redis_pid], client))
        captured = asyncio.run(_captured(m.redis_url))

    def med(name: str, field: str) -> float:
        return median([r[field] for r in runs[name]])

    base = med("plain", "rps")
    print(
        f"32 connections, metering on, one worker: plain {base:,.0f} req/s "
        f"(CPU/request gateway {med('plain', 'cpu0') * 1e6:.0f} us, Redis {med('plain', 'cpu1') * 1e6:.0f} us)"
    )
    for name, what in (("rollout", "rollout, 2 arms sticky per workflow"), ("capture", "capture of every request")):
        print(
            f"  {what}: {med(name, 'rps'):,.0f} req/s = {med(name, 'rps') / base:.0%} of plain; CPU/request "
            f"gateway {med(name, 'cpu0') * 1e6:.0f} us, Redis {med(name, 'cpu1') * 1e6:.0f} us"
        )
    print(f"capture: {captured:,} records written to qlp:capture:developer (stream bounded by capture.maxlen)")
    return 0 if captured > 0 else 1
