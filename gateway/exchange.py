"""What happened to one request, filled in along the request path (gateway/serving.py) and read by
metering, metrics, the capture and the shadow mirror. A plain record at the bottom of the import graph:
it imports nothing of the gateway but the endpoint's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.protocol import Endpoint

__all__ = ["Exchange"]


@dataclass(slots=True)
class Exchange:
    """What happened to one request; filled in along the path and handed to metering and metrics."""

    request_id: str
    started: float
    endpoint: Endpoint
    stream: bool = False
    tier: str | None = None
    requested_tier: str | None = None
    backend: str | None = None
    model: str | None = None
    agent: str | None = None
    workflow: str | None = None
    arm: str | None = None  # the rollout arm that served (gateway/rollout), None: no rollout applies
    tenant: str | None = None
    attempts: int = 0
    fallbacks: list[str] = field(default_factory=list)
    status: int = 0
    error_kind: str | None = None
    usage: dict[str, Any] | None = None
    output_estimate: int | None = None  # completion tokens counted locally, for when usage is missing
    cost_micros: int | None = None  # set by metering when the request is settled (served: > 0)
    reference_cost_micros: int | None = None  # the same tokens at the reference model's price
    upstream_seconds: float = 0.0  # time spent waiting on upstreams (for the gateway-overhead figure)
    first_byte_at: float | None = None
    captured: list[bytes] | None = None  # the response as sent, when the capture wants this exchange
    capture_limit: int = 0  # bytes: collecting stops past it (the capture then refuses the exchange)
