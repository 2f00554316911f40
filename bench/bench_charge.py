"""What booking a charge costs Redis: the CHARGE script alone, in batches as the gateway sends them.

    python -m bench bench_charge        (part of `make bench`)

A real Redis of its own; batches of BATCH charges of one key (a served request's record each, distinct
request ids, as under load), applied through the gateway's own `Ledger` one round trip at a time, so
that Redis and the client do not run at once. Figures: Redis CPU and client CPU per charge, for CHARGE
and, in the same run, for a script that takes the same arguments and does nothing (what the call itself
costs: the arguments, the script call, the reply). Interleaved in rounds; medians. On this machine the
gateway pays for Redis's CPU nearly one for one (docs/metering.md, Performance), so Redis's microseconds
per charge are the gateway's too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from bench.bench_metering import _cpu_seconds, redis_pid_of, redis_server
from bench.harness import median
from gateway.metering import ledger as ledger_mod
from gateway.metering.ledger import SEP, Charge, Ledger, LedgerPolicy
from gateway.metering.pipe import RedisPipe
from gateway.metering.scripts import CHARGE, Script

BATCH = 50
BATCHES = int(os.environ.get("QLP_BENCH_BATCHES", "400"))
ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "5"))
NOOP = Script("local n = (#ARGV - 4) / 2; local out = {}; for i = 1, n do out[i] = 1 end; return out")


def _charges() -> Callable[[], list[Charge]]:
    n = 0
    ts = time.time_ns() // 1_000_000
    prefix = os.urandom(8).hex()

    def batch() -> list[Charge]:
        nonlocal n
        out = []
        for _ in range(BATCH):
            n += 1
            cid = f"{prefix}{n:x}"
            record = {
                "id": cid,
                "request_id": os.urandom(16).hex(),
                "ts": ts,
                "tenant": "bench",
                "key_id": "k1",
                "workflow": None,
                "agent": None,
                "arm": None,
                "tier": "T0",
                "requested_tier": "T0",
                "backend": "local-t0",
                "model": "base",
                "endpoint": "chat",
                "stream": False,
                "prompt_tokens": 20,
                "completion_tokens": 10,
                "cached_tokens": 0,
                "cost_micros": 3,
                "reference_cost_micros": 1200,
                "reference_model": "gpt-4",
                "latency_ms": 1,
                "status": 200,
                "estimated": False,
                "attempts": 1,
                "fallback": ["T0"],
            }
            out.append(
                Charge(
                    cid,
                    ts,
                    "bench",
                    "k1",
                    True,
                    0,
                    3,
                    -300,
                    ts // 60_000,
                    record,
                    SEP.join(("T0", "local-t0/base", "", "")),
                )
            )
        return out

    return batch


async def _round(
    ledger: Ledger, script: Script, redis_pid: int, batch: Callable[[], list[Charge]]
) -> tuple[float, float]:
    """(Redis CPU, client CPU) per charge of BATCHES batches through `script`."""
    ledger_mod.CHARGE = script  # the ledger packs its calls for whichever script is named here
    await ledger.load_scripts()
    charges = [batch() for _ in range(BATCHES)]  # built before the clock starts: the records are not the cost
    redis0, client0 = _cpu_seconds(redis_pid), time.process_time()
    for b in charges:
        results = await ledger.apply(b)
        assert all(r == 1 for r in results), results[:3]
    n = BATCHES * BATCH
    return (_cpu_seconds(redis_pid) - redis0) / n, (time.process_time() - client0) / n


async def _run(url: str, redis_pid: int) -> dict[str, list[tuple[float, float]]]:
    pipe = RedisPipe(url, 10.0)
    ledger = Ledger(pipe, LedgerPolicy())
    batch = _charges()
    runs: dict[str, list[tuple[float, float]]] = {"charge": [], "noop": []}
    try:
        await _round(ledger, CHARGE, redis_pid, batch)  # warm-up
        for _ in range(ROUNDS):
            runs["charge"].append(await _round(ledger, CHARGE, redis_pid, batch))
            runs["noop"].append(await _round(ledger, NOOP, redis_pid, batch))
    finally:
        ledger_mod.CHARGE = CHARGE
        pipe.close()
    return runs


def main(argv: list[str]) -> int:
    with redis_server() as (url, _):
        runs = asyncio.run(_run(url, redis_pid_of(url)))

    def med(name: str, i: int) -> float:
        return median([r[i] for r in runs[name]]) * 1e6

    print(
        f"CHARGE, batches of {BATCH} charges of one key: Redis {med('charge', 0):.1f} us per charge, "
        f"client (packing the calls, reading the replies) {med('charge', 1):.1f} us per charge"
    )
    print(
        f"  the same arguments to a script that does nothing: Redis {med('noop', 0):.1f} us, client "
        f"{med('noop', 1):.1f} us per charge (what the call itself costs); {ROUNDS} rounds of {BATCHES} batches"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main([]))
