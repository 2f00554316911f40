"""`qlp up`, the way `make up` runs it: a real fleet on loopback, used, then stopped without leftovers.

One real vLLM engine serves T0-T2 here, as in the default config (all three tiers point at one port: the fleet
runner starts one engine per distinct port); `qlp up` shows vLLM's start-up phases while it loads.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.fakes.gateway import free_port

ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(needle: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                continue
    return [p for p in found if p != os.getpid()]


@pytest.mark.skipif(not (ROOT / "models/base/config.json").is_file(), reason="base model not prepared (make model)")
def test_local_fleet_serves_every_tier_books_it_and_leaves_nothing_running(tmp_path: Path) -> None:
    model_port, gw_port, redis_port = free_port(), free_port(), free_port()
    cfg = yaml.safe_load((ROOT / "config/tiers.yaml").read_text())
    for name in ("T0", "T1", "T2"):
        cfg["tiers"][name]["backends"][0]["base_url"] = f"http://127.0.0.1:{model_port}/v1"
    cfg_path = tmp_path / "tiers.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    var = tmp_path / "var"
    env = {**os.environ, "QLP_PORT": str(gw_port), "PYTHONUNBUFFERED": "1"}
    env.pop("QLP_T3_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "up",
            "--config",
            str(cfg_path),
            "--var",
            str(var),
            "--redis-port",
            str(redis_port),
            "--ready-timeout",
            "240",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out = ""
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while "Ctrl-C stops everything" not in out:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"qlp up exited early:\n{out}"
            out += line
            assert time.monotonic() < deadline, out
        assert "vLLM: loading the weights" in out and re.search(r"vLLM for T0, T1, T2 ready on :\d+ after", out), out
        key = re.search(r"API key\s+(qlp-\S+)", out).group(1)  # type: ignore[union-attr]
        gw = f"http://127.0.0.1:{gw_port}"
        client = openai.OpenAI(base_url=gw + "/v1", api_key=key, max_retries=0, timeout=120)
        for tier in ("T0", "T1", "T2"):
            r = client.chat.completions.with_raw_response.create(
                model="qlp-t0",
                messages=[{"role": "user", "content": "Say hi"}],
                max_tokens=4,
                extra_headers={"X-QLP-Tier": tier, "X-QLP-Workflow-Id": "wf-e2e"},
            )
            assert r.headers["x-qlp-tier"] == tier and r.parse().choices[0].message.content is not None

        ledger = httpx.get(gw + "/v1/ledger/workflows/wf-e2e", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        deadline = time.monotonic() + 30
        while ledger.json().get("requests", 0) < 3 and time.monotonic() < deadline:  # booking is asynchronous
            time.sleep(0.1)
            ledger = httpx.get(gw + "/v1/ledger/workflows/wf-e2e", headers={"Authorization": f"Bearer {key}"})
        assert {rec["tier"] for rec in ledger.json()["records"]} == {"T0", "T1", "T2"}
        metrics = httpx.get(gw + "/metrics").text
        for tier in ("T0", "T1", "T2"):
            assert re.search(rf'qlp_requests_total{{.*tier="{tier}".*}} [1-9]', metrics), tier
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    deadline = time.monotonic() + 10
    while (
        left := _processes_mentioning(str(tmp_path)) + _processes_mentioning(f"--port {model_port}")
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left running: {left}"
    assert proc.returncode == 0
