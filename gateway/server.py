"""`qlp gateway`: run the gateway under uvicorn (uvloop + httptools), one process per worker."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import uvicorn

from gateway.settings import Settings

__all__ = ["main"]


def main(argv: list[str]) -> int:
    s = Settings()
    p = argparse.ArgumentParser(prog="qlp gateway", description=__doc__)
    p.add_argument("--host", default=s.host)
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--workers", type=int, default=s.workers, help="processes (one per core is a good start)")
    p.add_argument("--config", default=str(s.config), help="fleet config (QLP_CONFIG)")
    p.add_argument("--log-level", default=s.log_level)
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    args = p.parse_args(argv)
    os.environ["QLP_CONFIG"] = args.config  # workers are fresh processes: hand settings over by environment
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its samples here; /metrics (served by any worker) aggregates them.
        mp_dir = tempfile.mkdtemp(prefix="qlp-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mp = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        mp.mkdir(parents=True, exist_ok=True)
        for stale in mp.glob("*.db"):  # samples of a previous run's processes
            stale.unlink()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        "gateway.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level=args.log_level,
        access_log=args.access_log,
        lifespan="on",
        timeout_graceful_shutdown=30,
        # Measured on the hot path: the forwarded-headers middleware and the Date/Server headers cost
        # throughput and nothing here reads them. Put a proxy's X-Forwarded-For in logs at the proxy.
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )
    return 0
