"""Metering fixtures: a real Redis server, a pricing file, keys, and a metered gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metering.keys import KeyInfo, KeyLimits, KeyStore, Role
from tests.fakes.gateway import RunningGateway
from tests.fakes.redis_server import RedisServer, redis_server_binary
from tests.fakes.upstream import FakeUpstream

T = TypeVar("T")
ADMIN_KEY = "qlp-test-admin-key-0123456789abcdef0123456789"
MSG = [{"role": "user", "content": "hi"}]

# Round prices so that expected costs are easy to state: T0 1 micro-USD per output token, T1 2 per input
# and 4 per output, and the reference model gpt-4 at its list price.
PRICING = {
    "reference_model": "gpt-4",
    "external": {"gpt-4": {"input": 30, "output": 60}},
    "local": {"T0": {"input": 0, "output": 1}, "T1": {"input": 2, "output": 4}},
}


def fleet(ups: dict[str, FakeUpstream], **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "default_tier": "T0",
        "health_interval": 60,
        "retry": {"max_attempts": 2, "backoff_base": 0.001, "backoff_max": 0.01},
        "tiers": {
            "T0": {"model": "m0", "aliases": ["qlp-t0"], "backends": [{"name": "a", "base_url": ups["a"].base_url}]},
            "T1": {"model": "m1", "aliases": ["qlp-t1"], "backends": [{"name": "b", "base_url": ups["b"].base_url}]},
        },
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make sysdeps installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    p = tmp_path / "pricing.yaml"
    p.write_text(yaml.safe_dump(PRICING))
    return p


def run(fn: Callable[[aredis.Redis], Any], url: str) -> Any:
    """Run `fn(client)` against Redis from a sync test (its own event loop and client)."""
    async def go() -> Any:
        client = aredis.Redis.from_url(url)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def create_key(url: str, tenant: str, role: Role = "user", **limits: int) -> tuple[str, KeyInfo]:
    result: tuple[str, KeyInfo] = run(lambda r: KeyStore(r).create(tenant, role=role, limits=KeyLimits(**limits)), url)
    return result


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` on `url`/metrics whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def eventually(fn: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `fn` until it returns something truthy (charges are booked just after the response is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {value!r}")
        time.sleep(0.02)


@pytest.fixture
def metered(upstreams: dict[str, FakeUpstream], gateway_factory: Callable[..., RunningGateway], redis_url: str,
            pricing_file: Path, tmp_path: Path) -> Callable[..., RunningGateway]:
    """Start a gateway with metering on against the test Redis (settings overridable)."""
    (tmp_path / "secrets").mkdir(exist_ok=True)
    (tmp_path / "secrets" / "admin_key").write_text(ADMIN_KEY)

    def make(config: dict[str, Any] | None = None, **settings: Any) -> RunningGateway:
        settings = {"metering": True, "redis_url": redis_url, "pricing": pricing_file, **settings}
        return gateway_factory(config or fleet(upstreams), **settings)

    return make


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(gw: RunningGateway, key: str | None, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    h = {**(auth(key) if key else {}), **headers}
    return httpx.post(gw.url + "/v1/chat/completions", json=body or {"model": "qlp-t0", "messages": MSG},
                      headers=h, timeout=20)


def workflow(gw: RunningGateway, key: str, wf: str) -> dict[str, Any] | None:
    r = httpx.get(f"{gw.url}/v1/ledger/workflows/{wf}", headers=auth(key), timeout=10)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def records(gw: RunningGateway, key: str, wf: str, n: int) -> list[dict[str, Any]]:
    """The workflow's ledger records, once there are `n` of them."""
    def ready() -> list[dict[str, Any]] | None:
        doc = workflow(gw, key, wf)
        return doc["records"] if doc and len(doc["records"]) >= n else None

    recs: list[dict[str, Any]] = eventually(ready, what=f"{n} ledger records in workflow {wf}")
    return recs
