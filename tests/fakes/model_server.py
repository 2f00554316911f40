"""A real `qlp model-server` subprocess for tests: started on a free port, stopped reliably.

Shared by the model-server, trainer and observability tests (each used to carry its own copy).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODEL_DIR", "RunningModelServer", "start_model_server", "stop_model_server"]

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "base"
QLP = Path(sys.executable).with_name("qlp")


@dataclass
class RunningModelServer:
    url: str
    proc: subprocess.Popen[str]
    log: Path


def start_model_server(args: list[str], log: Path, timeout: float = 180.0) -> RunningModelServer:
    """`qlp model-server --port 0 --model models/base ARGS`; returns once its ready line (with the URL) is
    printed. stderr goes to `log`; a server that exits first raises with the end of that log."""
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [str(QLP), "model-server", "--port", "0", "--model", str(MODEL_DIR), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")  # EOF: the process ended

    threading.Thread(target=pump, daemon=True, name="model-server-stdout").start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if not line:
                raise RuntimeError(f"model server exited before ready:\n{log.read_text()[-3000:]}")
            if line.startswith("model-server ready on "):
                return RunningModelServer(line.split(" on ", 1)[1].strip(), proc, log)
    except BaseException:
        stop_model_server(proc)
        raise


def stop_model_server(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
