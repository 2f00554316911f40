"""Soak: minutes of mixed traffic through a real `qlp gateway` (metering on, a real Redis) to a mock upstream
that counts what it produced; then the error rate, the gateway's memory over time, and the ledger against
the upstream's own usage, request by request.

    python -m bench.soak                                  # 10 minutes (not part of `make bench`)
    QLP_SOAK_SECONDS=120 QLP_SOAK_RPS=60 python -m bench.soak --json soak.json

Traffic (seeded): 40% non-streaming, 45% streams read to the end, 15% streams the client drops after one
to three chunks. Each request carries its own X-Request-Id, which the gateway sends upstream and books in
the ledger, so every record can be matched with what the upstream did.

Pass (exit 0) when: error rate < 0.1%; RSS growth < 10% (mean of the last window over the first; a window
is a minute, or a fifth of a shorter run); and the ledger matches the upstream: every request the upstream
served is booked exactly once, nothing else is booked, and each request that finished has exactly the
upstream's token counts (a dropped stream is charged what reached the client: at most what the upstream
produced, never nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

__all__ = ["SoakResult", "main", "run"]

ROOT = Path(__file__).resolve().parent.parent
PRICING = {
    "reference_model": "gpt-4",
    "external": {"gpt-4": {"input": 30, "output": 60}},
    "local": {"T0": {"input": 1, "output": 2}},
}
MAX_REQUESTS = 1_000_000  # a bound on any run, whatever its length


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the upstream --------------------------------------------------------------------------------------


@dataclass
class Served:
    stream: bool
    prompt: int
    completion: int  # what it reported (finished) or produced before the gateway hung up
    finished: bool = False


class MockUpstream:
    """OpenAI-compatible, on loopback, in a thread of its own; records per request id what it produced."""

    def __init__(self) -> None:
        self.served: dict[str, Served] = {}
        self.port = _free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = request.headers["X-Request-Id"]
        seed = sum(rid.encode())
        prompt, n = 5 + seed % 23, 2 + seed % 11
        rec = self.served[rid] = Served(bool(body.get("stream")), prompt, 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        if not rec.stream:
            rec.completion, rec.finished = n, True
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "ok " * n}, "finish_reason": "stop"}
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                }
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                rec.completion += 1
                await asyncio.sleep(0.01)
            tail = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [],
                "usage": usage,
            }
            await resp.write(b"data: " + orjson.dumps(tail) + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            rec.finished = True
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp

    def start(self) -> MockUpstream:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True, name="soak-upstream")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


# -- processes ---------------------------------------------------------------------------------------------


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def _wait(ok: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.05)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the load ------------------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    seconds: float
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rss_kib: list[tuple[float, int]] = field(default_factory=list)
    ledger: dict[str, int] = field(default_factory=dict)
    gateway_log_errors: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.error_count / max(1, self.requests)

    @property
    def rss_growth(self) -> float:
        """Mean RSS of the last window over that of the first, minus one."""
        if len(self.rss_kib) < 4:
            return 0.0
        window = min(60.0, self.seconds / 5)
        end = self.rss_kib[-1][0]
        first = [r for t, r in self.rss_kib if t <= window] or [self.rss_kib[0][1]]
        last = [r for t, r in self.rss_kib if t >= end - window] or [self.rss_kib[-1][1]]
        return (sum(last) / len(last)) / (sum(first) / len(first)) - 1

    @property
    def ledger_ok(self) -> bool:
        bad = ("missing", "duplicated", "phantom", "token_mismatch", "over_charged", "zero_charged")
        return all(self.ledger.get(k, 0) == 0 for k in bad) and self.ledger.get("records", 0) > 0

    @property
    def passed(self) -> bool:
        return self.error_rate < 0.001 and self.rss_growth < 0.10 and self.ledger_ok

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "by_kind": self.by_kind,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "rss_first_kib": self.rss_kib[0][1] if self.rss_kib else None,
            "rss_last_kib": self.rss_kib[-1][1] if self.rss_kib else None,
            "rss_growth": round(self.rss_growth, 4),
            "ledger": self.ledger,
            "gateway_log_errors": self.gateway_log_errors,
            "passed": self.passed,
        }


async def _load(
    url: str, key: str, seconds: float, rps: float, concurrency: int, seed: int, result: SoakResult, gateway_pid: int
) -> dict[str, str]:
    """Returns request id -> kind. Paced at `rps` (at most `concurrency` in flight)."""
    rng = random.Random(seed)
    kinds: dict[str, str] = {}
    start = time.monotonic()
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def error(kind: str) -> None:
        result.errors[kind] = result.errors.get(kind, 0) + 1

    async def one(session: aiohttp.ClientSession, rid: str, kind: str, drop_after: int) -> None:
        body = orjson.dumps(
            {"model": "qlp-t0", "messages": [{"role": "user", "content": f"soak {rid}"}], "stream": kind != "plain"}
        )
        try:
            async with session.post(url, data=body, headers={**headers, "X-Request-Id": rid}) as r:
                if r.status != 200:
                    error(f"{kind}: status {r.status}")
                    return
                if kind == "plain":
                    doc = await r.json()
                    if not doc.get("choices"):
                        error("plain: no choices")
                    return
                got = 0
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    got += chunk.count(b"data: {")
                    if kind == "drop" and got >= drop_after:
                        r.close()  # the client goes away mid-stream
                        return
                if not buf.rstrip().endswith(b"data: [DONE]"):
                    error("stream: no [DONE]")
        except (aiohttp.ClientError, TimeoutError) as exc:
            error(f"{kind}: {type(exc).__name__}")
        finally:
            sem.release()

    async def sample_rss() -> None:
        while True:
            result.rss_kib.append((time.monotonic() - start, _rss_kib(gateway_pid)))
            await asyncio.sleep(min(5.0, max(0.5, seconds / 40)))

    sampler = asyncio.create_task(sample_rss())
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        n = 0
        while time.monotonic() - start < seconds and n < MAX_REQUESTS:
            due = start + n / rps
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await sem.acquire()
            x = rng.random()
            kind = "plain" if x < 0.40 else "stream" if x < 0.85 else "drop"
            rid = f"soak-{seed}-{n}"
            kinds[rid] = kind
            result.by_kind[kind] = result.by_kind.get(kind, 0) + 1
            task = asyncio.create_task(one(session, rid, kind, rng.randint(1, 3)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks)
    sampler.cancel()
    result.requests = n
    result.rss_kib.append((time.monotonic() - start, _rss_kib(gateway_pid)))
    return kinds


# -- the ledger check ------------------------------------------------------------------------------------------


def _ledger_records(redis_url: str) -> list[dict[str, Any]]:
    from gateway.metering import ledger_cli

    out = io.StringIO()
    if ledger_cli.main(["--redis-url", redis_url, "export", "--format", "jsonl"], out) != 0:
        raise RuntimeError("qlp ledger export failed")
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _compare(records: list[dict[str, Any]], served: dict[str, Served], kinds: dict[str, str]) -> dict[str, int]:
    by_rid: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_rid.setdefault(rec["request_id"], []).append(rec)
    c = {
        "records": len(records),
        "served_upstream": len(served),
        "missing": 0,
        "duplicated": 0,
        "phantom": 0,
        "exact": 0,
        "token_mismatch": 0,
        "dropped_charged": 0,
        "over_charged": 0,
        "zero_charged": 0,
        "upstream_tokens": 0,
        "ledger_tokens": 0,
    }
    c["phantom"] = sum(1 for rid in by_rid if rid not in served)
    for rid, s in served.items():
        recs = by_rid.get(rid, [])
        if not recs:
            c["missing"] += 1
            continue
        if len(recs) > 1:
            c["duplicated"] += 1
        rec = recs[0]
        c["upstream_tokens"] += s.prompt + s.completion
        c["ledger_tokens"] += rec["prompt_tokens"] + rec["completion_tokens"]
        if kinds.get(rid) == "drop" and not rec["estimated"] and rec["completion_tokens"] == s.completion:
            c["exact"] += 1  # the usage chunk arrived before the client left
        elif kinds.get(rid) == "drop":
            c["dropped_charged"] += 1
            if rec["completion_tokens"] > s.completion:
                c["over_charged"] += 1
            if rec["completion_tokens"] < 1:
                c["zero_charged"] += 1
        elif (rec["prompt_tokens"], rec["completion_tokens"]) == (s.prompt, s.completion) and not rec["estimated"]:
            c["exact"] += 1
        else:
            c["token_mismatch"] += 1
    return c


# -- the run ----------------------------------------------------------------------------------------------------


def run(
    seconds: float = 600.0, rps: float = 40.0, concurrency: int = 16, seed: int = 1, workdir: Path | None = None
) -> SoakResult:
    """Start Redis, the mock upstream and `qlp gateway`; drive the load; compare the ledger; stop all."""
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (make sysdeps)")
    d = workdir or Path(tempfile.mkdtemp(prefix="qlp-soak-"))
    d.mkdir(parents=True, exist_ok=True)
    result = SoakResult(seconds)
    upstream = MockUpstream().start()
    redis_port, gw_port = _free_port(), _free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _start(
                [
                    redis_bin,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(d),
                ],
                d / "redis.log",
            )
        )
        import redis

        _wait(lambda: _ping(redis, redis_port), "redis-server")
        key = _create_key(redis_url)
        (d / "tiers.yaml").write_text(
            yaml.safe_dump(
                {
                    "default_tier": "T0",
                    "health_interval": 30,
                    "tiers": {
                        "T0": {
                            "model": "soak",
                            "aliases": ["qlp-t0"],
                            "backends": [{"name": "mock", "base_url": f"http://127.0.0.1:{upstream.port}/v1"}],
                        }
                    },
                }
            )
        )
        (d / "pricing.yaml").write_text(yaml.safe_dump(PRICING))
        env = {
            "QLP_METERING": "true",
            "QLP_REDIS_URL": redis_url,
            "QLP_PRICING": str(d / "pricing.yaml"),
            "QLP_SECRETS_DIR": str(d / "secrets"),
            "QLP_SPOOL_PATH": str(d / "spool" / "ledger.jsonl"),
        }
        gw = _start(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "gateway",
                "--port",
                str(gw_port),
                "--config",
                str(d / "tiers.yaml"),
                "--log-level",
                "warning",
            ],
            d / "gateway.log",
            env,
        )
        procs.append(gw)
        _wait(lambda: _http_ok(f"http://127.0.0.1:{gw_port}/healthz"), "qlp gateway")
        kinds = asyncio.run(
            _load(
                f"http://127.0.0.1:{gw_port}/v1/chat/completions", key, seconds, rps, concurrency, seed, result, gw.pid
            )
        )
        # Charges are booked just after each response: wait until the ledger stops growing.
        deadline = time.monotonic() + 60
        records = _ledger_records(redis_url)
        while len(records) < len(upstream.served) and time.monotonic() < deadline:
            time.sleep(0.2)
            records = _ledger_records(redis_url)
        result.ledger = _compare(records, upstream.served, kinds)
        _stop(gw)
        result.gateway_log_errors = sum(
            1
            for line in (d / "gateway.log").read_text(errors="replace").splitlines()
            if " ERROR " in line or "Traceback" in line
        )
    finally:
        for p in reversed(procs):
            _stop(p)
        upstream.stop()
        if workdir is None:
            shutil.rmtree(d, ignore_errors=True)
    return result


def _ping(redis: Any, port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _create_key(redis_url: str) -> str:
    from redis.asyncio import Redis

    from gateway.metering.keys import KeyStore

    async def go() -> str:
        client = Redis.from_url(redis_url)
        try:
            key, _ = await KeyStore(client).create("soak", name="soak")
            return key
        finally:
            await client.aclose()

    return asyncio.run(go())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=float(os.environ.get("QLP_SOAK_SECONDS", "600")))
    p.add_argument("--rps", type=float, default=float(os.environ.get("QLP_SOAK_RPS", "40")))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    res = run(args.seconds, args.rps, args.concurrency, args.seed)
    s = res.summary()
    print(json.dumps(s, indent=2))
    print(
        f"\nsoak {s['seconds']} s: {res.requests} requests {res.by_kind}, errors {res.error_count} "
        f"({res.error_rate:.4%}); RSS {s['rss_first_kib']} -> {s['rss_last_kib']} KiB "
        f"(growth {res.rss_growth:.2%}); ledger {res.ledger}; {'PASS' if res.passed else 'FAIL'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    return 0 if res.passed else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
