"""Reliability and security fixtures: a real Redis, metered gateways (in-process and as a `qlp gateway`
subprocess), tenants A and B, an admin key, the fault proxy, and canary secrets."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.faultproxy import FaultProxy
from tests.fakes.gateway import free_port
from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import FakeUpstream
from tests.metered import ADMIN_KEY, MSG, PRICING, auth, create_key

__all__ = ["ADMIN_KEY", "MSG", "PRICING", "auth"]

ROOT = Path(__file__).resolve().parents[2]
# Canaries: secret values planted where secrets live. None may ever show up where callers or operators
# look (error bodies, logs, /metrics, /healthz, /readyz, ledger reads and exports).
CANARY_T3 = "CANARY-t3-upstream-key-5f0c1e9a7b2d4c6e8f00"
CANARY_ADMIN = "qlp-CANARY-admin-key-0c4f6a8e2b1d3f5a7c9e"


def fleet(
    ups: dict[str, FakeUpstream],
    *,
    t0_url: str | None = None,
    max_attempts: int = 2,
    timeouts: dict[str, float] | None = None,
    breaker: dict[str, float] | None = None,
    t3: bool = False,
) -> dict[str, Any]:
    """T0 (local, -> `t0_url` or upstream a, no fallback), T1 (local, upstream b); T3 (OpenAI kind with an
    API key from the secret `t3_api_key`, upstream c) when asked."""
    t0: dict[str, Any] = {
        "model": "m0",
        "aliases": ["qlp-t0"],
        "adapters": ["dev-v1"],
        "agents": {"developer": "dev-v1"},
        "backends": [{"name": "a", "base_url": t0_url or ups["a"].base_url}],
    }
    if timeouts:
        t0["timeouts"] = timeouts
    cfg: dict[str, Any] = {
        "default_tier": "T0",
        "health_interval": 60,
        "retry": {"max_attempts": max_attempts, "backoff_base": 0.001, "backoff_max": 0.01},
        "breaker": breaker or {"failures": 50, "cooldown": 60},
        "tiers": {
            "T0": t0,
            "T1": {"model": "m1", "aliases": ["qlp-t1"], "backends": [{"name": "b", "base_url": ups["b"].base_url}]},
        },
    }
    if t3:
        cfg["tiers"]["T3"] = {
            "kind": "openai",
            "model": "gpt-4",
            "aliases": ["qlp-t3"],
            "backends": [{"name": "openai", "base_url": ups["c"].base_url, "api_key_secret": "t3_api_key"}],
        }
    return cfg


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir(exist_ok=True)
    (d / "admin_key").write_text(ADMIN_KEY)
    return d


@pytest.fixture
def default_fleet() -> Callable[..., dict[str, Any]]:
    """`metered` starts this folder's `fleet` (T3 and timeouts as options)."""
    return fleet


@pytest.fixture
def proxy(upstreams: dict[str, FakeUpstream]) -> Iterator[FaultProxy]:
    p = FaultProxy(upstreams["a"].port).start()
    yield p
    p.stop()


@dataclass
class Tenants:
    a: str
    a_id: str
    b: str
    b_id: str
    admin: str = ADMIN_KEY


@pytest.fixture
def tenants(redis_url: str) -> Tenants:
    a, ia = create_key(redis_url, "tenant-a")
    b, ib = create_key(redis_url, "tenant-b")
    return Tenants(a, ia.id, b, ib.id)


# -- a `qlp gateway` subprocess ------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start_gateway_process(
    config: dict[str, Any], directory: Path, env: dict[str, str], log_level: str = "info"
) -> GatewayProcess:
    """`qlp gateway` (uvicorn, uvloop, httptools: what production runs) with stdout+stderr to a file."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "tiers.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    log = directory / "gateway.log"
    full_env = {
        **os.environ,
        "QLP_METERING": "false",
        "QLP_SECRETS_DIR": str(directory / "secrets"),
        "QLP_SPOOL_PATH": str(directory / "spool" / "ledger.jsonl"),
        **env,
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "gateway",
                "--port",
                str(port),
                "--config",
                str(cfg),
                "--log-level",
                log_level,
                "--access-log",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gp = GatewayProcess(proc, port, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(gp.url + "/healthz", timeout=1).status_code == 200:
                return gp
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            gp.stop()
            raise RuntimeError(f"qlp gateway did not start:\n{gp.output()[-2000:]}")
        time.sleep(0.05)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(config: dict[str, Any], env: dict[str, str] | None = None, log_level: str = "info") -> GatewayProcess:
        gp = start_gateway_process(config, tmp_path / f"gw{len(started)}", env or {}, log_level)
        started.append(gp)
        return gp

    yield make
    for gp in started:
        gp.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, to kill and restart."""
    server = RedisServer(tmp_path / "redis-private").start()
    yield server
    server.stop()
