"""Helpers of the metered suites: keys in a real Redis, the test fleet and prices, ledger reads.

The fixtures that go with them (a session Redis, a pricing file, a metered gateway) are in tests/conftest.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from gateway.metering.keys import KeyInfo, KeyLimits, KeyStore, Role
from gateway.metering.layout import KeyKeys
from gateway.metering.ledger import SEP
from gateway.metering.meter import connect
from gateway.settings import Settings
from tests.fakes.gateway import RunningGateway
from tests.fakes.upstream import FakeUpstream
from tests.wait import eventually

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


def run(fn: Callable[[aredis.Redis], Any], url: str) -> Any:
    """Run `fn(client)` against Redis from a sync test (its own event loop and client)."""

    async def go() -> Any:
        client = connect(Settings(redis_url=url))
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


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(gw: RunningGateway, key: str | None, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    h = {**(auth(key) if key else {}), **headers}
    return httpx.post(
        gw.url + "/v1/chat/completions", json=body or {"model": "qlp-t0", "messages": MSG}, headers=h, timeout=20
    )


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


def ledger_totals(client: Any, key_id: str, **scan: Any) -> dict[str, int]:
    """A key's day counters summed from Redis (a sync client; `scan` e.g. `target_nodes` on a cluster):
    requests, prompt and completion tokens, cost."""
    totals = {"req": 0, "pt": 0, "ct": 0, "cost": 0}
    for key in client.scan_iter(KeyKeys(key_id).counters("*"), **scan):
        for field, value in client.hgetall(key).items():
            name = field.decode().rsplit(SEP, 1)[1]
            if name in totals:
                totals[name] += int(value)
    return totals


def load_client(url_of: Callable[[int], str], key: str) -> tuple[Callable[[int], int], Callable[[], int]]:
    """`one(i)` sends request i (even: streamed) to `url_of(i)` and answers 200 only for a complete answer;
    `done()` counts the requests finished so far (for a test that acts mid-load)."""
    done = 0
    lock = threading.Lock()

    def one(i: int) -> int:
        nonlocal done
        body = {"model": "qlp-t0", "messages": MSG, "stream": i % 2 == 0}
        with httpx.stream("POST", url_of(i) + "/v1/chat/completions", json=body, headers=auth(key), timeout=30) as r:
            raw = r.read()
        ok = r.status_code == 200 and (not body["stream"] or raw.rstrip().endswith(b"data: [DONE]"))
        with lock:
            done += 1
        return 200 if ok else r.status_code or 599

    return one, lambda: done
