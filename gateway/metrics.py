"""Prometheus metrics of the gateway (prefix `qlp_`).

Labels are bounded by configuration: tier and backend names come from the fleet config, `model` is the
upstream model or adapter the gateway itself chose (never the caller's string), error kinds and status
classes are fixed sets. Never a tenant, key, workflow or request id.

Several worker processes: `qlp gateway --workers N` sets PROMETHEUS_MULTIPROC_DIR, every process writes its
samples there, and /metrics aggregates them (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Metrics", "observe", "render"]

# From sub-millisecond gateway overhead to ten-minute streams.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

STATUS_CLASSES = ("2xx", "4xx", "5xx")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        lb = ("tier", "backend", "stream")
        self.latency = Histogram(
            "qlp_request_duration_seconds",
            "End-to-end request latency in the gateway",
            lb,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "qlp_time_to_first_token_seconds",
            "Request start to the first byte sent to the client",
            lb,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "qlp_gateway_overhead_seconds",
            "Time spent in the gateway itself (end-to-end minus waiting on upstreams)",
            ("tier", "stream"),
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "qlp_requests_total",
            "Requests by tier, backend and status class",
            ("tier", "backend", "status_class"),
            registry=r,
        )
        self.tokens = Counter(
            "qlp_tokens_total",
            "Tokens by tier, model and kind (prompt|completion)",
            ("tier", "model", "kind"),
            registry=r,
        )
        self.cost = Counter("qlp_cost_usd_total", "Booked cost in USD", ("tier", "model"), registry=r)
        self.reference_cost = Counter(
            "qlp_reference_cost_usd_total",
            "What the same tokens would have cost on the reference external model",
            ("tier", "model"),
            registry=r,
        )
        self.upstream_errors = Counter(
            "qlp_upstream_errors_total", "Upstream failures by kind", ("tier", "backend", "kind"), registry=r
        )
        self.retries = Counter("qlp_retries_total", "Upstream attempts beyond the first", ("tier",), registry=r)
        self.fallbacks = Counter(
            "qlp_fallbacks_total", "Requests served by a fallback tier", ("from_tier", "to_tier"), registry=r
        )
        self.admissions = Counter(
            "qlp_admissions_total",
            "Admissions of metered requests by how they were "
            "decided: lease (in-process), redis (a round trip), without_redis (fail open)",
            ("how",),
            registry=r,
        )
        self.budget_rejections = Counter(
            "qlp_budget_rejections_total", "Requests refused: budget exhausted", ("tier",), registry=r
        )
        self.rate_limit_rejections = Counter(
            "qlp_rate_limit_rejections_total", "Requests refused: rate limit", ("tier",), registry=r
        )
        self.feedback = Counter(
            "qlp_feedback_total", "Feedback outcomes", ("tier", "backend", "model", "outcome"), registry=r
        )
        self.capture = Counter(
            "qlp_capture_total",
            "Exchanges offered to the capture, by outcome (captured|too_large|dropped|failed)",
            ("tier", "outcome"),
            registry=r,
        )
        self.shadow = Counter(
            "qlp_shadow_requests_total",
            "Shadow (mirrored) requests by target tier, backend and result (ok|error|dropped)",
            ("tier", "backend", "result"),
            registry=r,
        )
        self.inflight = Gauge(
            "qlp_inflight_requests", "Requests in flight", ("tier",), registry=r, multiprocess_mode="livesum"
        )
        self.backend_state = Gauge(
            "qlp_backend_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open (worst over processes)",
            ("tier", "backend"),
            registry=r,
            multiprocess_mode="max",
        )
        self.backend_up = Gauge(
            "qlp_backend_up",
            "Last health probe succeeded (1) or not (0)",
            ("tier", "backend"),
            registry=r,
            multiprocess_mode="min",
        )
        # The spool file is shared by the workers: the latest reading is the truth, not a sum.
        # labels() costs microseconds (lock, validation); the label sets are bounded, so keep the children.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.spool_depth = Gauge(
            "qlp_ledger_spool_depth",
            "Ledger charges waiting in the local spool",
            registry=r,
            multiprocess_mode="livemostrecent",
        )


def child(m: Metrics, metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, memoised per process."""
    key = (id(metric), labels)
    c = m._children.get(key)
    if c is None:
        c = m._children[key] = metric.labels(*labels)
    return c


def render(metrics: Metrics) -> bytes:
    """The exposition text: aggregated over worker processes when running in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(metrics.registry)


UPSTREAM_KINDS = frozenset(
    {
        "connect",
        "timeout_connect",
        "timeout_first_byte",
        "timeout_idle",
        "timeout_total",
        "status_5xx",
        "status_429",
        "upstream_auth",
        "protocol",
        "stream_truncated",
        "empty_stream",
        "rejected",
    }
)


def observe(m: Metrics, x: Any, now: float) -> None:
    """Record one finished request (a `gateway.exchange.Exchange`)."""
    tier = x.tier or x.requested_tier or "none"
    backend = x.backend or "none"
    stream = "true" if x.stream else "false"
    total = now - x.started
    status = x.status or 500
    child(m, m.requests, tier, backend, STATUS_CLASSES[min(2, max(0, status // 100 - 2))]).inc()
    if status < 400:
        child(m, m.latency, tier, backend, stream).observe(total)
    if x.first_byte_at is not None:
        child(m, m.ttft, tier, backend, stream).observe(x.first_byte_at - x.started)
    if x.backend is not None:
        child(m, m.overhead, tier, stream).observe(max(0.0, total - x.upstream_seconds))
    if x.attempts > 1:
        child(m, m.retries, tier).inc(x.attempts - 1)
    for to_tier in x.fallbacks:
        child(m, m.fallbacks, x.requested_tier or "none", to_tier).inc()
    if x.error_kind in UPSTREAM_KINDS:
        child(m, m.upstream_errors, tier, backend, x.error_kind).inc()
    if x.cost_micros is not None and x.model is not None:
        child(m, m.cost, tier, x.model).inc(x.cost_micros / 1e6)
        child(m, m.reference_cost, tier, x.model).inc((x.reference_cost_micros or 0) / 1e6)
    if x.error_kind == "budget_exceeded":
        child(m, m.budget_rejections, tier).inc()
    elif x.error_kind == "rate_limit_exceeded":
        child(m, m.rate_limit_rejections, tier).inc()
    usage = x.usage
    if isinstance(usage, dict) and x.model is not None:
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens")
            if isinstance(n, int) and n > 0:
                child(m, m.tokens, tier, x.model, kind).inc(n)
