"""Shared fixtures: scriptable loopback upstreams, a gateway factory (real sockets, real HTTP) and real vLLM."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.gateway import RunningGateway, start_gateway
from tests.fakes.upstream import FakeUpstream

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
    v = launch.start(MODEL_ROOT, launch.free_port(), log, timeout=240, dtype="float32", kv_cache_gib=1,
                     extra=["--max-model-len", str(VLLM_MAX_MODEL_LEN), "--max-num-seqs", "16"])
    yield RunningVllm(v.url, v.proc, log)
    launch.stop(v.proc)
