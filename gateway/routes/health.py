"""GET /healthz (the process is alive) and GET /readyz (every tier has a reachable backend and, with
metering on, requests can be admitted: Redis answers, or admission fails open)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from gateway.breaker import BreakerState
from gateway.config import backend_key
from gateway.runtime import Runtime

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: every tier has a reachable backend",
    response_model=None,
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}}},
        503: {
            "description": "Not ready (same body: which tier or the ledger is down)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def readyz(request: Request) -> JSONResponse:
    rt: Runtime = request.app.state.runtime
    probed = await rt.probe_once()
    now = time.monotonic()
    tiers: dict[str, Any] = {}
    ready = True
    for name, tier in rt.config.tiers.items():
        backends = {}
        for b in tier.backends:
            key = backend_key(name, b.name)
            br = rt.breakers[key]
            configured = not b.api_key_secret or rt.backend_keys[key] is not None
            # Backends without a health path (external APIs) count as reachable while configured and closed.
            up = configured and probed.get(key, br.current(now) is not BreakerState.OPEN)
            backends[b.name] = {"up": up, "breaker": br.current(now).name.lower(), "configured": configured}
        tier_ok = any(v["up"] for v in backends.values())
        if backends and not any(v["configured"] for v in backends.values()):
            # A tier whose credentials are not set (T3 on a laptop) is off, not broken: it does not hold
            # readiness back; requests to it get 503 naming the missing setting.
            tiers[name] = {"ready": False, "state": "not_configured", "backends": backends}
            continue
        ready = ready and tier_ok
        tiers[name] = {"ready": tier_ok, "state": "ready" if tier_ok else "down", "backends": backends}
    body: dict[str, Any] = {"tiers": tiers}
    if rt.meter is not None:
        ledger = await rt.meter.status()
        ready = ready and bool(ledger.pop("ready"))
        body["ledger"] = ledger
    return JSONResponse({"status": "ready" if ready else "not_ready", **body}, status_code=200 if ready else 503)
