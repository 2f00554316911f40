"""Start a real gateway (uvicorn, real sockets) on loopback inside the test process."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from gateway.app import Gateway, create_app
from gateway.settings import Settings

__all__ = ["RunningGateway", "free_port", "start_gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningGateway:
    app: Gateway
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> Any:
        return self.app.runtime

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_gateway(config: dict[str, Any], tmp_path: Path, **settings: Any) -> RunningGateway:
    """Metering is off unless a test turns it on (`metering=True`, with `redis_url` and `pricing`)."""
    cfg = tmp_path / f"tiers-{time.monotonic_ns()}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    settings.setdefault("metering", False)
    settings.setdefault("spool_path", tmp_path / "spool" / "ledger.jsonl")
    s = Settings(config=cfg, secrets_dir=tmp_path / "secrets", **settings)
    app = create_app(s)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="gateway")
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.01)
    return RunningGateway(app, server, thread, port)
