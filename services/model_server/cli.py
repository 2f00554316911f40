"""`qlp model-server`: the CPU/GPU reference server with vLLM's OpenAI API and adapter endpoints.

Flags mirror `vllm serve` where vLLM has them. Examples:

    qlp model-server                                        # models/base on 127.0.0.1:8100
    qlp model-server --port 8101 --lora-modules t1-dev=models/adapters/t1-dev/v3
    qlp model-server --port 0 --allowed-adapter-dir /tmp/adapters   # any free port

Once the model is loaded and the port is accepting, one line goes to stdout:
`model-server ready on http://HOST:PORT` (tests and `qlp up` wait for it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from .settings import LoraModule, Settings

__all__ = ["build_settings", "main", "parse_lora_module"]


def parse_lora_module(raw: str) -> LoraModule:
    """vLLM's two spellings: `name=path`, or JSON `{"name": ..., "path": ...}`."""
    if raw.lstrip().startswith("{"):
        try:
            obj = json.loads(raw)
            return LoraModule(str(obj["name"]), Path(obj["path"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"bad --lora-modules JSON: {raw!r}") from exc
    name, sep, path = raw.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules expects name=path, got {raw!r}")
    return LoraModule(name, Path(path))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlp model-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Settings()
    p.add_argument("--model", type=Path, default=d.model, help="model folder (qlp prepare-model output)")
    p.add_argument(
        "--served-model-name", default=d.served_model_name, help="name of the base model in the API"
    )
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port (printed on the ready line)")
    p.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=[], metavar="NAME=PATH",
                   help="adapters to load at start (paths must lie in an allowed adapter dir)")  # fmt: skip
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="adapters loaded at once")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--allowed-adapter-dir", type=Path, action="append", default=None, metavar="DIR",
                   help="directory adapters may be loaded from; repeatable (default: models/adapters)")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="sequences decoded together")
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="sequences that may wait for a batch slot before 503",
    )
    p.add_argument("--max-n", type=int, default=d.max_n, help="largest n (choices) per request")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d.dtype)
    p.add_argument(
        "--num-threads", type=int, default=d.num_threads, help="torch threads (0: torch's default)"
    )
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])  # fmt: skip
    return p


def build_settings(args: argparse.Namespace) -> Settings:
    return Settings(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        lora_modules=list(args.lora_modules),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_model_len=args.max_model_len,
        allowed_adapter_dirs=args.allowed_adapter_dir or [Path("models/adapters")],
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_n=args.max_n,
        device=args.device,
        dtype=args.dtype,
        num_threads=args.num_threads,
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = build_settings(args)
    except ValueError as exc:
        print(f"qlp model-server: {exc}", file=sys.stderr)
        return 2
    # No hub access here: everything comes from local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Set before torch loads OpenMP. With the default (spinning) wait policy, a 2-core machine shared with
    # other busy processes (the fleet runs up to three servers) made each decode step 5-10x slower; passive
    # waiting costs a few percent when the machine is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    import uvicorn

    from .app import create_app

    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    # Bound before the model loads: the port is ours (and known, with --port 0) before we say ready.
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        print(f"qlp model-server: cannot bind {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    sock.listen(2048)
    settings.port = sock.getsockname()[1]

    def ready() -> None:
        print(f"model-server ready on http://{settings.host}:{settings.port}", flush=True)

    config = uvicorn.Config(
        create_app(settings, on_ready=ready),
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1
