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
def process(
    args: list[str], env: dict[str, str] | None = None, health: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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
    with process(
        [PY, "-m", "bench.mock.stream_server", str(port), str(n_chunks), str(interval)],
        health=f"http://127.0.0.1:{port}/health",
    ):
        yield f"http://127.0.0.1:{port}/v1"


def fleet_config(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "default_tier": "T0",
        "health_interval": 30,
        "tiers": {
            "T0": {"model": "bench", "aliases": ["qlp-t0"], "backends": [{"name": "mock", "base_url": base_url}]}
        },
        **extra,
    }


@contextlib.contextmanager
def gateway(
    base_url: str, workers: int = 1, env: dict[str, str] | None = None, config: dict[str, Any] | None = None
) -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="qlp-gw-"))
    cfg = d / "tiers.yaml"
    cfg.write_text(yaml.safe_dump(config or fleet_config(base_url)))
    port = free_port()
    args = [
        PY,
        "-m",
        "gateway.cli",
        "gateway",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--config",
        str(cfg),
        "--log-level",
        "warning",
    ]
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


def wrk(
    url: str,
    connections: int,
    duration: int = 8,
    threads: int = 1,
    env: dict[str, str] | None = None,
    timeout: int | None = None,
) -> dict[str, float]:
    """requests/s and latency percentiles (seconds) from wrk; also `requests` (completed) and `errors` (socket
    errors and timeouts). `timeout` (seconds) overrides wrk's 2 s, past which it records no latency."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (make sysdeps)")
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--latency",
            *(["--timeout", f"{timeout}s"] if timeout else []),
            "-s",
            str(ROOT / "bench/mock/post.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    res: dict[str, float] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", out)
    res["requests"] = float(total.group(1)) if total else res["rps"] * duration
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["errors"] = float(sum(int(g) for g in sock.groups())) if sock else 0.0
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
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json", "X-QLP-Tier": "T0", **(headers or {})}
                ) as r:
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
    return {
        "ttfb_p50": pct(ttfb, 50),
        "ttfb_p99": pct(ttfb, 99),
        "gap_p50": pct(gaps, 50),
        "gap_p99": pct(gaps, 99),
        "dropped": float(dropped),
        "n": float(len(ttfb)),
    }


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


# -- helpers for the side-by-side benchmarks (bench_litellm, bench_scale, bench_vllm) --------------------

RESULTS = ROOT / "bench" / "results"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (CPU seconds so far); gone processes count 0."""
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pid_on_port(port: int) -> int:
    """The pid of the process listening on a loopback TCP port (a server that a launcher started)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # 0A: LISTEN
                    inode = f[9]
    if inode is None:
        raise RuntimeError(f"nothing listens on port {port}")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                for fd in (d / "fd").iterdir():
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return int(d.name)
    raise RuntimeError(f"no process holds the socket of port {port}")


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-file limit (children inherit it) towards `want`; returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ensure_venv(
    path: Path, requirements: list[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> Path:
    """The python of a bench-only virtual environment at `path`, created and filled with `requirements` (pip
    specifiers, pinned by the caller) when missing. Raises RuntimeError with pip's last lines on failure."""
    python = path / "bin" / "python"
    stamp = path / ".bench-requirements"
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        subprocess.run(
            [sys.executable if sys.prefix == sys.base_prefix else _base_python(), "-m", "venv", str(path)], check=True
        )
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"installing {' '.join(requirements)} into {where} (once)", flush=True)
    try:
        r = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *requirements],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"pip install took longer than {timeout:.0f} s") from exc
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n{tail}")
    stamp.write_text(wanted)
    return python


def _base_python() -> str:
    """The interpreter this venv was made from (a new venv must not nest inside ours)."""
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(exe) if exe.exists() else "python3"


def machine_note() -> str:
    """What else the machine was doing: cores and load average at the time of the run."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.1f} (1 min) {five:.1f} (5 min) at {time.strftime('%Y-%m-%d %H:%M')}"


def write_results(name: str, data: dict[str, Any], table: str) -> None:
    """bench/results/<name>.json and <name>.md (the table), then the plots (bench/plot.py) where it can."""
    import json

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(f"results: {(RESULTS / f'{name}.json').relative_to(ROOT)}, {(RESULTS / f'{name}.md').relative_to(ROOT)}")
    plot_python = ROOT / "bench" / ".venv-litellm" / "bin" / "python"  # bench-only venv that has matplotlib
    if not plot_python.exists():
        print("plots skipped: bench/.venv-litellm is missing (python -m bench bench_litellm creates it)")
        return
    r = subprocess.run(
        [str(plot_python), str(ROOT / "bench" / "plot.py"), str(RESULTS), name], capture_output=True, text=True
    )
    print((r.stdout + r.stderr).strip() or "plots: nothing to plot")
