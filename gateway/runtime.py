"""What the gateway process holds while it runs: config, the HTTP pool, breakers, secrets, the prober,
and the meter (Redis pool, ledger, spool) when metering is on.

Built by `create_app`, started and stopped by the app's lifespan; handlers receive it, never a global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.breaker import Breaker, BreakerState
from gateway.capture.capture import Capture
from gateway.config import Backend, FleetConfig, Tier, backend_key, backend_provider
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.metering.meter import Meter, connect
from gateway.metering.pricing import load_pricing
from gateway.metrics import Metrics
from gateway.protocol import Endpoint
from gateway.providers import Provider
from gateway.rollout.registry import Rollouts
from gateway.rollout.shadow import ShadowRunner
from gateway.routing import BackendState, TierResolver
from gateway.settings import Settings
from gateway.upstream import UpstreamClient

__all__ = ["Runtime", "UpstreamCall"]

log = logging.getLogger("qlp.gateway")


def _root(base_url: str) -> str:
    """http://host:port/v1 -> http://host:port (health paths are relative to the host root, as vLLM's)."""
    scheme, _, rest = base_url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One upstream request, ready for `UpstreamClient.post`."""

    url: str
    body: bytes
    headers: dict[str, str]
    provider: Provider


@dataclass
class Runtime:
    settings: Settings
    config: FleetConfig
    resolver: TierResolver = field(init=False)
    client: UpstreamClient = field(init=False)
    breakers: dict[str, Breaker] = field(init=False)
    backend_keys: dict[str, str | None] = field(init=False)
    providers: dict[str, Provider] = field(init=False)
    meter: Meter | None = field(default=None, init=False)
    rollouts: Rollouts = field(init=False)
    shadow: ShadowRunner = field(init=False)
    capture: Capture | None = field(default=None, init=False)
    started_at: int = field(default_factory=lambda: int(time.time()), init=False)
    metrics: Metrics = field(default_factory=Metrics, init=False)
    _prober: asyncio.Task[None] | None = field(default=None, init=False)
    _refresher: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.resolver = TierResolver(self.config)
        self.client = UpstreamClient()
        b = self.config.breaker
        # Backend names are unique per tier; key breakers by "tier/backend" so two tiers may reuse a name.
        self.breakers = {
            self.key(t, be): Breaker(b.failures, b.cooldown) for t in self.config.tiers.values() for be in t.backends
        }
        self.backend_keys = {}
        for t in self.config.tiers.values():
            for be in t.backends:
                self.backend_keys[self.key(t, be)] = (
                    self.settings.secret(be.api_key_secret) if be.api_key_secret else None
                )
        self.client.secrets = tuple(v for v in self.backend_keys.values() if v)
        self.providers = {
            self.key(t, be): backend_provider(t, be) for t in self.config.tiers.values() for be in t.backends
        }
        if self.settings.metering:
            self.meter = Meter(self.settings, self.config, load_pricing(self.settings.pricing), metrics=self.metrics)
        # Runtime rollout changes and capture live in Redis: with metering off, only the config's rollouts.
        self.rollouts = Rollouts(self.config, self.meter.redis if self.meter is not None else None)
        self.shadow = ShadowRunner(self)
        if self.config.capture.targets:
            admin = self.settings.secret("admin_key")
            self.capture = Capture(
                self.config.capture,
                connect(self.settings),
                (*self.client.secrets, *((admin,) if admin else ())),
                metrics=self.metrics,
            )

    @staticmethod
    def key(tier: Tier, backend: Backend) -> str:
        return backend_key(tier.name, backend.name)

    def states(self, tier_name: str, backends: tuple[Backend, ...], now: float) -> dict[str, BackendState]:
        return {b.name: self.breakers[backend_key(tier_name, b.name)].view(now) for b in backends}

    def prepare(
        self,
        tier: Tier,
        backend: Backend,
        model: str,
        body: dict[str, Any],
        endpoint: Endpoint,
        stream: bool,
        request_id: str,
    ) -> UpstreamCall:
        """The request as this backend's provider writes it (the proxy's attempts and the shadow's mirror).
        InvalidRequest: this provider cannot express it; ServiceUnavailable: the backend's secret is unset."""
        key = backend_key(tier.name, backend.name)
        provider = self.providers[key]
        if endpoint not in provider.endpoints:
            raise InvalidRequest(f"tier {tier.name} serves only /v1/chat/completions", code="unsupported_endpoint")
        try:
            data = provider.request_body(body, model, stream)
        except orjson.JSONEncodeError as exc:
            # orjson reads 1024 levels of nesting but writes only 254: such a body is no request for any
            # upstream (and was a 500).
            raise InvalidRequest("request body is nested too deeply", code="invalid_json") from exc
        secret = self.backend_keys[key]
        if backend.api_key_secret and secret is None:
            raise ServiceUnavailable(
                f"tier {tier.name} upstream {backend.name!r} is not configured: set QLP_{backend.api_key_secret.upper()}"
                f" or the file {self.settings.secrets_dir}/{backend.api_key_secret}",
                code="upstream_not_configured",
                should_retry=False,
            )
        return UpstreamCall(
            backend.base_url + provider.path(endpoint, model), data, provider.headers(secret, request_id), provider
        )

    async def start(self) -> None:
        await self.client.start()
        if self.meter is not None:
            await self.meter.start()
        if self.capture is not None:
            await self.capture.start()
        if self.rollouts.redis is not None:
            self._refresher = asyncio.create_task(self.rollouts.refresh_loop(), name="qlp-rollout-refresher")
        self._prober = asyncio.create_task(self._probe_loop(), name="qlp-health-prober")

    async def stop(self) -> None:
        for task in (self._prober, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.shadow.drain()
        if self.capture is not None:
            await self.capture.stop()
            with contextlib.suppress(Exception):
                await self.capture.redis.aclose()
        if self.meter is not None:
            await self.meter.stop()
        await self.client.close()

    async def probe_once(self) -> dict[str, bool]:
        """Probe every backend that has a health path; feed the result to its breaker."""
        targets = [
            (self.key(t, b), _root(b.base_url) + b.health_path)
            for t in self.config.tiers.values()
            for b in t.backends
            if b.health_path
        ]
        results = await asyncio.gather(*(self.client.get_ok(url, 2.0) for _, url in targets))
        now = time.monotonic()
        out: dict[str, bool] = {}
        for (key, _), ok in zip(targets, results, strict=True):
            br = self.breakers[key]
            if ok and br.state is BreakerState.OPEN:
                # The server answers again: let one real request through as the half-open probe now,
                # rather than after the cooldown. Its result closes or re-opens the breaker.
                br.state = BreakerState.HALF_OPEN
                br.probe_in_flight = False
            elif not ok and br.state is not BreakerState.OPEN:
                br.trip(now)
            out[key] = ok
            tier_name, backend_name = key.split("/", 1)
            self.metrics.backend_up.labels(tier_name, backend_name).set(1 if ok else 0)
        return out

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_once()
            except Exception:  # a prober bug must not kill the process; it is logged and retried
                log.exception("health probe failed")
            await asyncio.sleep(self.config.health_interval)
