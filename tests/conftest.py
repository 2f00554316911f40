"""Shared fixtures: scriptable loopback upstreams and a gateway factory (real sockets, real HTTP)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.gateway import RunningGateway, start_gateway
from tests.fakes.upstream import FakeUpstream


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
