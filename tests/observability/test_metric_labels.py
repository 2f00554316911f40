"""Labels are bounded by configuration: whatever callers put in `model`, X-QLP-Tier, X-QLP-Workflow-Id,
X-QLP-Agent or X-Request-Id, the gateway's /metrics does not grow a series per value.

The gateway runs as `qlp gateway` in its own process (the production server, and the second core: ten
thousand requests take a few seconds instead of half a minute with client and server sharing a GIL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fakes.gateway import free_port
from tests.fakes.upstream import FakeUpstream
from tests.wait import eventually

TOTAL = 10_000
FIRST = 100
QLP = Path(sys.executable).with_name("qlp")


@contextlib.contextmanager
def gateway_process(config: dict[str, Any], tmp: Path) -> Iterator[str]:
    cfg = tmp / "tiers.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "QLP_METERING": "false", "QLP_SECRETS_DIR": str(tmp), "QLP_SPOOL_PATH": str(tmp / "spool")}
    with (tmp / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(QLP), "gateway", "--port", str(port), "--config", str(cfg), "--log-level", "warning"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"qlp gateway exited: {(tmp / 'gateway.log').read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        return False

    try:
        eventually(up, 30, "qlp gateway to answer /healthz")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _series(gw_url: str, client: httpx.Client) -> tuple[int, str]:
    text = client.get(gw_url + "/metrics").text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#")), text


def _request(client: httpx.Client, url: str, i: int) -> int:
    """Four shapes, so the first hundred requests already show every label combination: an unknown tier
    (400), and junk models served by the default tier, plain, streamed, and with an unknown agent."""
    headers = {"X-QLP-Workflow-Id": f"junk-workflow-{i}", "X-Request-Id": f"junk-request-{i}"}
    body: dict[str, Any] = {"model": f"junk-model-{i}", "messages": [{"role": "user", "content": "hi"}]}
    shape = i % 4
    if shape == 0:
        headers["X-QLP-Tier"] = f"junk-tier-{i}"
    elif shape == 2:
        body["stream"] = True
    elif shape == 3:
        headers["X-QLP-Agent"] = f"junk-agent-{i}"
    return client.post(url, json=body, headers=headers).status_code


def test_metrics_series_do_not_grow_with_caller_supplied_values(
    upstreams: dict[str, FakeUpstream], tmp_path: Path
) -> None:
    up = upstreams["a"]
    config = {
        "default_tier": "T0",
        "catch_all": True,
        "health_interval": 60,
        "tiers": {"T0": {"model": "m0", "aliases": ["qlp-t0"], "backends": [{"name": "a", "base_url": up.base_url}]}},
    }
    with (
        gateway_process(config, tmp_path) as gw,
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=8)) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        url = gw + "/v1/chat/completions"
        statuses = list(pool.map(lambda i: _request(client, url, i), range(FIRST)))
        after_first, _ = _series(gw, client)
        statuses += pool.map(lambda i: _request(client, url, i), range(FIRST, TOTAL))
        after_all, text = _series(gw, client)
    assert statuses.count(400) == TOTAL // 4 and statuses.count(200) == TOTAL - TOTAL // 4, set(statuses)
    assert after_all == after_first, f"{after_first} series after {FIRST} requests, {after_all} after {TOTAL}"
    assert "junk" not in text, "a caller-supplied value became a label"
    up.requests.clear()  # 7,500 recorded bodies: free them now
