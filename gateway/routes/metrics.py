"""GET /metrics: Prometheus exposition (aggregated over worker processes)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from gateway.config import backend_key
from gateway.metrics import render
from gateway.runtime import Runtime

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    now = time.monotonic()
    m = rt.metrics
    for tier in rt.config.tiers.values():
        for b in tier.backends:
            m.backend_state.labels(tier.name, b.name).set(int(rt.breakers[backend_key(tier.name, b.name)].current(now)))
    if rt.meter is not None:
        m.spool_depth.set(await asyncio.to_thread(rt.meter.spool.depth))
    return Response(render(m), media_type=CONTENT_TYPE_LATEST)
