"""Shared pieces of the benchmarks: mock upstreams, a gateway subprocess, wrk, and figures.

Every benchmark measures a baseline side by side in the same run (these machines are noisy) and reports
ratios or differences against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str] | None = None, health: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if health:
            wait_http(health)
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def nginx_mock() -> Iterator[str]:
    """Yields the base URL (with /v1) of an nginx that answers every POST with a fixed completion."""
    if not shutil.which("nginx"):
        raise SystemExit("nginx is not installed (make sysdeps)")
    d = Path(tempfile.mkdtemp(prefix="qlp-nginx-"))
    port = free_port()
    conf = (ROOT / "bench/mock/nginx.conf.tmpl").read_text().replace("{dir}", str(d)).replace("{port}", str(port))
    (d / "nginx.conf").write_text(conf)
    with process(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)], health=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1"
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def stream_mock(n_chunks: int = 20, interval: float = 0.02) -> Iterator[str]:
    port = free_port()
    with process([PY, "-m", "bench.mock.stream_server", str(port), str(n_chunks), str(interval)],
                 health=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1"


def fleet_config(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "default_tier": "T0",
        "health_interval": 30,
        "tiers": {"T0": {"model": "bench", "aliases": ["qlp-t0"],
                         "backends": [{"name": "mock", "base_url": base_url}]}},
        **extra,
    }


@contextlib.contextmanager
def gateway(base_url: str, workers: int = 1, env: dict[str, str] | None = None,
            config: dict[str, Any] | None = None) -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="qlp-gw-"))
    cfg = d / "tiers.yaml"
    cfg.write_text(yaml.safe_dump(config or fleet_config(base_url)))
    port = free_port()
    args = [PY, "-m", "gateway.cli", "gateway", "--port", str(port), "--workers", str(workers),
            "--config", str(cfg), "--log-level", "warning"]
    # Metering is off unless the caller turns it on (bench_metering does, with a Redis of its own).
    env = {"QLP_SECRETS_DIR": str(d), "QLP_METERING": "false", **(env or {})}
    with process(args, env=env, health=f"http://127.0.0.1:{port}/healthz"):
        yield f"http://127.0.0.1:{port}"
    shutil.rmtree(d, ignore_errors=True)


def _seconds(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, connections: int, duration: int = 8, threads: int = 1, env: dict[str, str] | None = None) -> dict[str, float]:
    """requests/s and latency percentiles (seconds) from wrk."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (make sysdeps)")
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency",
         "-s", str(ROOT / "bench/mock/post.lua"), url],
        capture_output=True, text=True, check=True, env={**os.environ, **(env or {})},
    ).stdout
    res: dict[str, float] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}"] = _seconds(m.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = float(errors.group(1)) if errors else 0.0
    return res


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def stream_ttfb(url: str, streams: int, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Open `streams` SSE requests at once; time to first body byte, inter-chunk gap, and drops."""
    import aiohttp

    body = b'{"model":"qlp-t0","stream":true,"messages":[{"role":"user","content":"count"}]}'
    ttfb: list[float] = []
    gaps: list[float] = []
    dropped = 0
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def one() -> None:
            nonlocal dropped
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json",
                                                                  "X-QLP-Tier": "T0", **(headers or {})}) as r:
                    first = True
                    last = 0.0
                    done = False
                    async for chunk in r.content.iter_any():
                        now = time.perf_counter()
                        if first:
                            ttfb.append(now - t0)
                            first = False
                        else:
                            gaps.append(now - last)
                        last = now
                        done = done or b"[DONE]" in chunk
                    if not done:
                        dropped += 1
            except aiohttp.ClientError:
                dropped += 1

        await asyncio.gather(*(one() for _ in range(streams)))
    return {"ttfb_p50": pct(ttfb, 50), "ttfb_p99": pct(ttfb, 99), "gap_p50": pct(gaps, 50),
            "gap_p99": pct(gaps, 99), "dropped": float(dropped), "n": float(len(ttfb))}


def rss_mb(pid: int) -> float:
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for t in Path(f"/proc/{pid}/task").iterdir():
            kids = (t / "children").read_text().split()
            for k in kids:
                out += [int(k), *_children(int(k))]
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ms(x: float) -> str:
    return f"{x * 1000:.3f} ms"
