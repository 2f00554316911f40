"""Per-backend circuit breaker and in-flight count, per gateway process.

closed --N consecutive failures--> open --cooldown--> half-open --probe ok--> closed
                                                       half-open --probe fails--> open
In half-open exactly one request is let through as the probe; the others see the backend unavailable.
The clock is passed in so the state machine is testable without sleeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.routing import BackendState

__all__ = ["Breaker", "BreakerState"]


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(slots=True)
class Breaker:
    failures_to_open: int
    cooldown: float
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False
    inflight: int = 0

    def current(self, now: float) -> BreakerState:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cooldown:
            self.state = BreakerState.HALF_OPEN
            self.probe_in_flight = False
        return self.state

    def view(self, now: float) -> BackendState:
        s = self.current(now)
        available = s is BreakerState.CLOSED or (s is BreakerState.HALF_OPEN and not self.probe_in_flight)
        return BackendState(available=available, inflight=self.inflight)

    def acquire(self, now: float) -> None:
        """Called when a request is sent to this backend."""
        self.inflight += 1
        if self.current(now) is BreakerState.HALF_OPEN:
            self.probe_in_flight = True

    def release(self) -> None:
        self.inflight -= 1

    def success(self) -> None:
        self.consecutive_failures = 0
        self.state = BreakerState.CLOSED
        self.probe_in_flight = False

    def failure(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.failures_to_open:
            self.trip(now)

    def upstream_failed(self, kind: str, now: float) -> None:
        """An attempt failed before its first byte, as `kind` (UpstreamError.kind) says."""
        if kind == "rejected":
            self.success()  # it answered: healthy, the request was at fault
        elif kind != "status_429":  # a rate limit is the upstream pacing us, not failing
            self.failure(now)

    def trip(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.probe_in_flight = False
