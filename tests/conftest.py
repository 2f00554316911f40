"""Shared fixtures: scriptable loopback upstreams, a gateway factory (real sockets, real HTTP), a real Redis
and a metered gateway on it, and real vLLM."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes.gateway import RunningGateway, start_gateway
from tests.fakes.redis_cluster import RedisClusterServer, cluster_binaries
from tests.fakes.redis_server import RedisServer, redis_server_binary
from tests.fakes.upstream import FakeUpstream
from tests.metered import ADMIN_KEY, PRICING, fleet

MODEL_ROOT = Path(__file__).resolve().parents[1] / "models" / "base"


@dataclass
class RunningVllm:
    url: str  # http://127.0.0.1:PORT (no /v1)
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="session")
def _upstreams() -> Iterator[dict[str, FakeUpstream]]:
    ups = {name: FakeUpstream(name).start() for name in ("a", "b", "c")}
    yield ups
    for u in ups.values():
        u.stop()


@pytest.fixture
def upstreams(_upstreams: dict[str, FakeUpstream]) -> dict[str, FakeUpstream]:
    for u in _upstreams.values():
        u.reset()
    return _upstreams


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    started: list[RunningGateway] = []

    def make(config: dict[str, Any], **settings: Any) -> RunningGateway:
        gw = start_gateway(config, tmp_path, **settings)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


# -- real Redis and a metered gateway -----------------------------------------------------------------------


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


@pytest.fixture
def default_fleet() -> Callable[..., dict[str, Any]]:
    """The fleet config `metered` starts by default (a suite's conftest may override it)."""
    return fleet


@pytest.fixture
def metered(
    upstreams: dict[str, FakeUpstream],
    gateway_factory: Callable[..., RunningGateway],
    redis_url: str,
    pricing_file: Path,
    tmp_path: Path,
    default_fleet: Callable[..., dict[str, Any]],
) -> Callable[..., RunningGateway]:
    """Start a gateway with metering on against the test Redis (settings overridable)."""
    (tmp_path / "secrets").mkdir(exist_ok=True)
    (tmp_path / "secrets" / "admin_key").write_text(ADMIN_KEY)

    def make(config: dict[str, Any] | None = None, **settings: Any) -> RunningGateway:
        settings = {"metering": True, "redis_url": redis_url, "pricing": pricing_file, **settings}
        return gateway_factory(config or default_fleet(upstreams), **settings)

    return make


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """A real Redis Cluster for the session: 3 masters, a replica each (started on first use, ~10 s)."""
    if not cluster_binaries():
        msg = "redis-server and redis-cli are needed for the Redis Cluster tests (make sysdeps)"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    c = RedisClusterServer(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture
def cluster_url(cluster: RedisClusterServer) -> str:
    for node in cluster.nodes:  # a test before may have killed one: bring the cluster back whole
        if not node.alive():
            node.start()
    cluster.wait_ok(replicated=True)
    cluster.flushall()
    return cluster.url


# -- real vLLM ----------------------------------------------------------------------------------------------

# One vLLM engine for the whole session (it takes ~25 s to start on 2 cores), shared by every suite that needs a
# model server: tests/vllm, the trainer's publish and loop, the Prometheus end-to-end. float32, so that its greedy
# output can be compared token for token with PEFT's (the fleet itself runs bfloat16 where the CPU has it).
VLLM_MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningVllm]:
    from services.vllm import launch

    assert (MODEL_ROOT / "config.json").is_file(), "models/base is missing: run `make model` first"
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    v = launch.start(
        MODEL_ROOT,
        launch.free_port(),
        log,
        timeout=240,
        dtype="float32",
        kv_cache_gib=1,
        extra=["--max-model-len", str(VLLM_MAX_MODEL_LEN), "--max-num-seqs", "16"],
    )
    yield RunningVllm(v.url, v.proc, log)
    launch.stop(v.proc)
