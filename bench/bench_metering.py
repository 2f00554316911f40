"""What metering costs: the gateway with metering on (API key, Redis admission, ledger charge) against the
same gateway with metering off, same run, same mock upstream.

    python -m bench bench_metering        (part of `make bench`)

Figures (one gateway worker each, this machine, Redis on loopback):
  * requests/s at 32 connections, on and off, and the ratio (target: on >= 80% of off); on is measured
    with Redis over loopback TCP (the default) and over its Unix socket (a Redis on the gateway's host)
  * added latency p50/p99 at 1 connection: on minus off
  * CPU per request of the gateway process (on and off) and of Redis: on a small shared machine these say
    more than requests/s, which move with whatever else runs
  * a check that the ledger booked every request that wrk saw answered
Runs are interleaved in 16 rounds of 2 s (off and on back to back, in turn first) and the medians reported;
the on/off ratio is the median of the rounds' ratios (this machine's speed drifts within seconds: many
short pairs estimate the ratio better than a few long ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.harness import free_port, gateway, median, ms, nginx_mock, wrk

ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "16"))
DURATION = int(os.environ.get("QLP_BENCH_SECONDS", "2"))

PRICING = {
    "reference_model": "gpt-4",
    "external": {"gpt-4": {"input": 30, "output": 60}},
    "local": {"T0": {"gpu_hour_usd": 0.80, "tokens_per_hour": 9_000_000}},
}


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    """Yields the Redis URL over TCP and over its Unix socket."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (make sysdeps)")
    d = Path(tempfile.mkdtemp(prefix="qlp-redis-"))
    port = free_port()
    p = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(d),
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
            str(d / "redis.sock"),
            "--unixsocketperm",
            "700",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", f"unix://{d / 'redis.sock'}?db=0"
    finally:
        p.terminate()
        p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


async def _create_key(url: str) -> str:
    """A key for the benchmark on whatever Redis `url` names (one server or a cluster)."""
    from gateway.metering.keys import KeyLimits, KeyStore
    from gateway.metering.meter import connect
    from gateway.settings import Settings

    r = connect(Settings(redis_url=url))
    try:
        # Limits on, but out of reach: the admission script does all its work (windows, reservation).
        key, _ = await KeyStore(r).create("bench", limits=KeyLimits(10**15, 10**15, 10**9, 10**12))
        return key
    finally:
        await r.aclose()


async def _booked(url: str) -> int:
    from redis.asyncio import Redis

    from gateway.metering import reader

    r = Redis.from_url(url)
    try:
        day = dt.datetime.now(dt.UTC).date()
        s = await reader.summary(r, ["bench"], "tier", day - dt.timedelta(days=1), day)
        return int(s["total"]["requests"])
    finally:
        await r.aclose()


def _admissions(url: str) -> dict[str, float]:
    """qlp_admissions_total of a gateway, by how admissions were decided (lease, redis, without_redis)."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("qlp_admissions_total{"):
            how = line.split('how="', 1)[1].split('"', 1)[0]
            out[how] = float(line.rsplit(" ", 1)[1])
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_pid_of(url: str) -> int:
    """The pid of the Redis (started by `redis_server`) listening at `url`."""
    return _pid_of("redis-server", f":{url.rsplit(':', 1)[1].split('/')[0]}")


def _pid_of(*needles: str) -> int:
    """The process whose command line contains every needle (the gateway by its port, Redis by its)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if all(n in cmd for n in needles):
                    return int(d.name)
    raise RuntimeError(f"no process with {needles}")


@dataclass
class MeteredSetup:
    """What a metered gateway benchmark runs against: the nginx mock, a Redis of its own, an API key with
    every limit set (out of reach), and the gateway settings that turn metering on against that Redis."""

    upstream: str
    redis_url: str
    redis_unix: str
    redis_pid: int
    key: str
    env: dict[str, str]


@contextlib.contextmanager
def metered_setup(prefix: str) -> Iterator[MeteredSetup]:
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    pricing = tmp / "pricing.yaml"
    pricing.write_text(yaml.safe_dump(PRICING))
    try:
        with nginx_mock() as upstream, redis_server() as (redis_url, redis_unix):
            key = asyncio.run(_create_key(redis_url))
            redis_pid = redis_pid_of(redis_url)
            env = {
                "QLP_METERING": "true",
                "QLP_REDIS_URL": redis_url,
                "QLP_PRICING": str(pricing),
                "QLP_SPOOL_PATH": str(tmp / "spool" / "ledger.jsonl"),
            }
            yield MeteredSetup(upstream, redis_url, redis_unix, redis_pid, key, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gateway_pid(url: str) -> int:
    """The pid of the gateway process (started by bench.harness.gateway) listening at `url`."""
    return _pid_of("gateway.cli", "--port " + url.rsplit(":", 1)[1])


def _measured(url: str, conns: int, pids: list[int], env: dict[str, str] | None = None) -> dict[str, float]:
    """wrk figures plus the CPU seconds each pid used per request during the run."""
    before = [_cpu_seconds(p) for p in pids]
    r = wrk(url, conns, DURATION, env=env)
    n = max(r["rps"] * DURATION, 1.0)
    for i, (p, b) in enumerate(zip(pids, before, strict=True)):
        r[f"cpu{i}"] = (_cpu_seconds(p) - b) / n
    assert r["non2xx"] == 0, r
    return r


def main(argv: list[str]) -> int:
    with metered_setup("qlp-bench-metering-") as m:
        upstream, redis_url, redis_pid, on_env = m.upstream, m.redis_url, m.redis_pid, m.env
        auth = {"QLP_BENCH_KEY": m.key}
        with (
            gateway(upstream, env={"QLP_METERING": "false"}) as off,
            gateway(upstream, env=on_env) as on,
            gateway(upstream, env={**on_env, "QLP_REDIS_URL": m.redis_unix}) as unix,
        ):
            pids = {name: gateway_pid(url) for name, url in (("off", off), ("on", on), ("unix", unix))}
            urls = {name: url + "/v1/chat/completions" for name, url in (("off", off), ("on", on), ("unix", unix))}
            for url in urls.values():  # warm-up
                wrk(url, 32, 2, env=auth)
            runs: dict[str, list[dict[str, float]]] = {"off32": [], "on32": [], "unix32": [], "off1": [], "on1": []}
            for i in range(ROUNDS):
                # off and on back to back, in turn first: a machine that speeds up or slows down within a
                # round favours neither
                pair = [("off", [pids["off"]], None), ("on", [pids["on"], redis_pid], auth)]
                if i % 2:
                    pair.reverse()
                for name, ps, env in pair:
                    runs[name + "32"].append(_measured(urls[name], 32, ps, env))
                runs["unix32"].append(_measured(urls["unix"], 32, [pids["unix"], redis_pid], auth))
                for name, ps, env in pair:
                    runs[name + "1"].append(_measured(urls[name], 1, ps, env))
            admissions = _admissions(on)
        answered = sum(r["rps"] * DURATION for k in ("on32", "unix32", "on1") for r in runs[k])
        booked = asyncio.run(_booked(redis_url))

    def med(run: str, field: str) -> float:
        return median([r[field] for r in runs[run]])

    # Each round measures off and on one right after the other: the ratio of a round compares like with
    # like on a machine whose speed drifts; the figure is the median of the rounds' ratios.
    ratios = sorted(on["rps"] / off["rps"] for on, off in zip(runs["on32"], runs["off32"], strict=True))
    ratio = median(ratios)
    print(
        f"32 connections: metering on {med('on32', 'rps'):,.0f} req/s, off {med('off32', 'rps'):,.0f} req/s: "
        f"on = {ratio:.0%} of off (median of the rounds' ratios {', '.join(f'{r:.0%}' for r in ratios)}; "
        f"target >= 80%)"
    )
    print(
        f"  CPU per request: gateway {med('on32', 'cpu0') * 1e6:.0f} us on, {med('off32', 'cpu0') * 1e6:.0f} us off; "
        f"Redis {med('on32', 'cpu1') * 1e6:.0f} us (all processes share this machine's cores)"
    )
    print(
        f"  Redis over its Unix socket (same host): {med('unix32', 'rps'):,.0f} req/s = "
        f"{med('unix32', 'rps') / med('off32', 'rps'):.0%} of off; CPU per request: gateway "
        f"{med('unix32', 'cpu0') * 1e6:.0f} us, Redis {med('unix32', 'cpu1') * 1e6:.0f} us"
    )
    print(
        f"1 connection: added latency p50 {ms(med('on1', 'p50') - med('off1', 'p50'))}, "
        f"p99 {ms(med('on1', 'p99') - med('off1', 'p99'))} (on p50 {ms(med('on1', 'p50'))} p99 {ms(med('on1', 'p99'))}, "
        f"off p50 {ms(med('off1', 'p50'))} p99 {ms(med('off1', 'p99'))})"
    )
    # One request at a time the cores are mostly idle, so CPU per request is not inflated by the other
    # processes' work (on this machine a busy sibling core slows a core's work down 2x or more).
    print(
        f"  CPU per request at 1 connection: gateway {med('on1', 'cpu0') * 1e6:.0f} us on, "
        f"{med('off1', 'cpu0') * 1e6:.0f} us off; Redis {med('on1', 'cpu1') * 1e6:.0f} us"
    )
    total = sum(admissions.values()) or 1.0
    print(
        f"admissions of the metered gateway (TCP): {admissions.get('lease', 0) / total:.1%} from leases (in-process), "
        f"{admissions.get('redis', 0) / total:.1%} through Redis (leases report when given back)"
    )
    print(
        f"ledger: {booked:,} requests booked; wrk saw about {answered:,.0f} answered in the measured runs "
        f"(plus the warm-up; wrk does not count requests cut off at the end of a run)"
    )
    return 0
