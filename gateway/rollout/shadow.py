"""Shadow traffic: mirror a share of one tier's requests (typically T3's) to another (a local tier), for
comparison, without the caller ever seeing the shadow's answer and without billing the tenant.

A mirrored request starts after the caller's response is complete, as a background task: it adds no
latency and cannot fail the real request. It is always non-streamed, goes to a healthy backend of the
shadow tier (breaker state is read, not changed: shadow traffic must not eject a backend the real traffic
uses), and is booked in the shadow ledger, never in the tenant's:

    qlp:shadow:ledger   STREAM  field "r": {id, request_id, ts, tenant, workflow, agent, source_tier, tier,
                                 backend, model, prompt_tokens, completion_tokens, cost_micros,
                                 reference_cost_micros, latency_ms, status}

At most `max_inflight` shadow calls run per process; beyond that a mirror is dropped (and counted): the
shadow must not become the load that slows the tier down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import GatewayError
from gateway.metering.pricing import Tokens, tokens_from_usage
from gateway.metrics import child
from gateway.rollout.arms import point
from gateway.rollout.model import Shadow
from gateway.routing import Target, choose_backend, target_in

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.protocol import ParsedRequest
    from gateway.runtime import Runtime

__all__ = ["SHADOW_STREAM", "ShadowRunner"]

log = logging.getLogger("qlp.rollout")

SHADOW_STREAM = "qlp:shadow:ledger"
STREAM_MAXLEN = 1_000_000
_NOT_FORWARDED = ("stream", "stream_options")


class ShadowRunner:
    def __init__(self, rt: Runtime, max_inflight: int = 16) -> None:
        self.rt = rt
        self.max_inflight = max_inflight
        self._tasks: set[asyncio.Task[None]] = set()

    def maybe_mirror(self, x: Exchange, req: ParsedRequest) -> None:
        """Called once the caller's response is complete. Cheap when the request is not mirrored."""
        r = self.rt.rollouts.lookup(x.requested_tier or "", x.agent)
        s = r.shadow if r is not None else None
        if s is None or s.share <= 0 or point("shadow", x.request_id) >= s.share:
            return
        if len(self._tasks) >= self.max_inflight:
            child(self.rt.metrics, self.rt.metrics.shadow, s.tier, "none", "dropped").inc()
            return
        body = {k: v for k, v in req.body.items() if k not in _NOT_FORWARDED}
        task = asyncio.create_task(self._mirror(s, x, req, body), name="qlp-shadow")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _mirror(self, s: Shadow, x: Exchange, req: ParsedRequest, body: dict[str, Any]) -> None:
        rt = self.rt
        tier = rt.config.tiers[s.tier]
        tgt = Target(tier, s.adapter, s.adapter) if s.adapter else target_in(tier, req.model, x.agent)
        backend = choose_backend(
            tier.backends, rt.states(tier.name, tier.backends, time.monotonic()), tier.policy, random.random()
        )
        if backend is None:
            child(rt.metrics, rt.metrics.shadow, tier.name, "none", "error").inc()
            return
        t0 = time.perf_counter()
        status, usage = 200, None
        try:
            call = rt.prepare(tier, backend, tgt.model, body, req.endpoint, False, f"{x.request_id}-shadow")
            resp = await rt.client.post(call.url, call.body, call.headers, tier.timeouts, call.provider)
            try:
                raw = await resp.read()
            finally:
                resp.close()
            parsed = orjson.loads(raw)
            usage = parsed.get("usage") if isinstance(parsed, dict) else None
        except (GatewayError, orjson.JSONDecodeError, ValueError) as exc:
            status = exc.status if isinstance(exc, GatewayError) else 502
        except Exception:  # a shadow must never take anything down with it
            log.exception("shadow request %s failed", x.request_id)
            status = 500
        latency_ms = round((time.perf_counter() - t0) * 1000)
        child(rt.metrics, rt.metrics.shadow, tier.name, backend.name, "ok" if status == 200 else "error").inc()
        await self._book(x, s, tier.name, backend.name, tgt.model, usage, status, latency_ms)

    async def _book(
        self,
        x: Exchange,
        s: Shadow,
        tier: str,
        backend: str,
        model: str,
        usage: dict[str, Any] | None,
        status: int,
        latency_ms: int,
    ) -> None:
        meter = self.rt.meter
        if meter is None:
            return
        toks = tokens_from_usage(usage) or Tokens(0, 0)
        cost = meter.pricing.price(self.rt.config.tiers[tier], model).cost(toks) if status == 200 else 0
        record = {
            "id": os.urandom(12).hex(),
            "request_id": x.request_id,
            "ts": time.time_ns() // 1_000_000,
            "tenant": x.tenant,
            "workflow": x.workflow,
            "agent": x.agent,
            "source_tier": x.tier,
            "tier": tier,
            "backend": backend,
            "model": model,
            "prompt_tokens": toks.prompt,
            "completion_tokens": toks.completion,
            "cost_micros": cost,
            "reference_cost_micros": meter.pricing.reference.cost(toks),
            "latency_ms": latency_ms,
            "status": status,
        }
        try:
            await meter.redis.xadd(SHADOW_STREAM, {"r": orjson.dumps(record)}, maxlen=STREAM_MAXLEN, approximate=True)
        except Exception as exc:  # best effort: the shadow ledger is for comparison, not billing
            log.warning("shadow record for %s not booked: %s", x.request_id, type(exc).__name__)
