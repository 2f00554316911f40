"""Admission leases: a busy key's requests are admitted in-process, from an allowance reserved in Redis.

A key this process admits often (at the rate of at least LEASE_MIN_DEMAND requests per lease period) asks
ADMIT for up to two periods' worth of requests at once: ADMIT decides the first of them like any request, then counts
`granted` requests and `granted` times the worst-case tokens in the key's rate window and reserves
`granted` times the worst-case cost against its budgets, as one reservation (never more than half of what
is left of any limit: other processes keep their share). The next requests of that key are admitted here,
without a round trip, while the lease lasts (`lease_seconds`, and never past the end of the rate window's
minute) and covers their worst case in each dimension. Before a lease runs out (half of its time or of its
requests gone) the next one is asked for in the background, so that a steadily busy key's requests
never wait for Redis; a request that finds the lease spent while the next one is on its way waits for it
(one round trip, shared). A request a lease does not cover (a larger worst case, a refused renewal) goes
to Redis on its own, as without leases.

A lease is a reservation like a request's, so every bound of the budgets and limits holds as it did:
all that processes admit is reserved in Redis first. The difference is timing: a lease's reservation
covers its requests until the lease is closed and the last of them settled, although their charges book
their real cost as they come (conservative: the key's headroom looks smaller for that long, never larger);
then one release gives back the unused reservation, requests and tokens. A key revoked (or limits changed)
while a lease is live keeps being admitted by that process until the lease ends: at most `lease_seconds`
(the admin route that revokes a key closes its leases in its own process at once). A process that dies
holding a lease leaves a reservation that expires like any other.

Keys with little traffic never get a lease: each request has its own admission, exactly as without this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.metering.keys import Principal
from gateway.metering.ledger import Charge

__all__ = ["LEASE_MAX", "LEASE_MIN_DEMAND", "Lease", "Leases"]

LEASE_MIN_DEMAND = 8  # admissions of a key in one lease period before it gets leases
LEASE_MAX = 4096  # requests per lease at most
MAX_KEYS = 10_000  # keys tracked per process; beyond, keys without a live lease are forgotten


@dataclass(slots=True)
class Lease:
    id: str  # its reservation's member in Redis is `<id>:<reserved>`; its release is booked under this id
    principal: Principal
    flags: int  # ADMIT's: 1 budget, 2 tokens/min, 4 requests/min
    ts_ms: int
    minute: int  # the rate window its requests and tokens were counted in
    expires: float  # monotonic
    requests: int  # left
    tokens: int  # left (worst case)
    micros: int  # left (worst case)
    reserved: int  # the reservation made for the whole lease
    unit_micros: int  # the worst case of one request it was sized with (a renewal asks for the same)
    unit_tokens: int
    renew_at: float  # monotonic: ask for the next lease from then on
    renew_below: int  # ... or once fewer requests than this are left
    inflight: int = 0
    used: int = 0  # requests admitted from it in-process (the one that asked for it is not one of them)
    closed: bool = False
    released: bool = False


class _Key:
    """One API key's demand and current lease, in this process."""

    __slots__ = ("count", "lease", "period_start", "previous", "renewing")

    def __init__(self, now: float) -> None:
        self.count = 0  # admissions in the current period
        self.previous = 0  # admissions in the period before
        self.period_start = now
        self.lease: Lease | None = None
        self.renewing: asyncio.Event | None = None  # set when the lease asked for is answered


class Leases:
    """The leases of one gateway process. `release` books a closed and settled lease's unused part."""

    def __init__(
        self,
        seconds: float,
        release: Callable[[Charge], None],
        renew: Callable[[str, Lease, int], None],
        used: Callable[[int], None] | None = None,
    ) -> None:
        self.seconds = seconds
        self._release = release
        self._renew = renew  # (sha256, the lease running out, requests wanted): ask for the next one
        self._used = used  # (admissions a lease served): counted once per lease, not per request
        self._keys: dict[str, _Key] = {}

    def _key(self, sha256: str, now: float) -> _Key:
        k = self._keys.get(sha256)
        if k is None:
            if len(self._keys) >= MAX_KEYS:
                self._forget_idle()
            self._keys[sha256] = k = _Key(now)
        elif now >= k.period_start + self.seconds:
            k.previous = k.count if now < k.period_start + 2 * self.seconds else 0
            k.count = 0
            k.period_start = now
        return k

    def take(self, sha256: str, worst_micros: int, worst_tokens: int, minute: int, count: bool = True) -> Lease | None:
        """The key's live lease when it covers one more request of this worst case (taken from it); else
        None. Counts the admission toward the key's demand (unless `count` is False: a second try)."""
        now = time.monotonic()
        k = self._key(sha256, now)
        if count:
            k.count += 1
        lease = k.lease
        if lease is None or lease.closed:
            return None
        if now >= lease.expires or minute != lease.minute:
            self.close(lease)
            return None
        if (
            lease.requests < 1
            or (lease.flags & 2 and lease.tokens < worst_tokens)
            or (lease.flags & 1 and lease.micros < worst_micros)
        ):
            return None
        lease.requests -= 1
        lease.tokens -= worst_tokens
        lease.micros -= worst_micros
        lease.inflight += 1
        lease.used += 1
        if k.renewing is None and (now >= lease.renew_at or lease.requests < lease.renew_below):
            wanted = self.wanted(sha256)
            if wanted > 1:
                self._renew(sha256, lease, wanted)
        return lease

    def pending(self, sha256: str) -> asyncio.Event | None:
        """Set once the lease on its way for this key (if any) is answered."""
        k = self._keys.get(sha256)
        return None if k is None else k.renewing

    def wanted(self, sha256: str) -> int:
        """How many requests the admission of this key that `take` did not cover should ask for: 1 (just
        this one) unless the key is busy and no lease is on its way already. More than 1: the caller asks
        for a lease and must call `answered` when ADMIT has answered (or failed)."""
        k = self._keys.get(sha256)
        if k is None or k.renewing is not None:
            return 1
        # Requests per period: the last period's, or the current one's so far at its rate (a burst from idle
        # gets a lease that fits it at once, not after a ramp of round trips).
        if max(k.count, k.previous) < LEASE_MIN_DEMAND:
            return 1
        elapsed = max(time.monotonic() - k.period_start, 0.005)
        demand = max(k.previous, int(k.count * min(self.seconds / elapsed, 50)))
        k.renewing = asyncio.Event()
        return min(LEASE_MAX, 2 * demand)

    def granted(
        self,
        sha256: str,
        lease_id: str,
        principal: Principal,
        flags: int,
        ts_ms: int,
        granted: int,
        worst_micros: int,
        worst_tokens: int,
        taken: int,
    ) -> Lease:
        """Install the lease ADMIT granted; `taken` (0 or 1): the request that asked for it takes its share."""
        now = time.monotonic()
        k = self._key(sha256, now)
        minute = ts_ms // 60_000
        duration = min(self.seconds, ((minute + 1) * 60_000 - ts_ms) / 1000)
        left = granted - taken
        lease = Lease(
            lease_id,
            principal,
            flags,
            ts_ms,
            minute,
            now + duration,
            left,
            left * worst_tokens,
            left * worst_micros,
            granted * worst_micros if flags & 1 else 0,
            worst_micros,
            worst_tokens,
            now + 0.5 * duration,
            granted // 2,
            inflight=taken,
        )
        if k.lease is not None:
            self.close(k.lease)
        k.lease = lease
        if left == 0:  # just the request that asked (the limits had no room for more): given back once it settles
            lease.closed = True
            return lease
        asyncio.get_running_loop().call_later(duration, self.close, lease)
        return lease

    def answered(self, sha256: str) -> None:
        """The admission that asked for a lease was answered (granted, refused or failed): the next one
        that `take` does not cover may ask again."""
        k = self._keys.get(sha256)
        if k is not None and k.renewing is not None:
            k.renewing.set()
            k.renewing = None

    def settled(self, lease: Lease) -> None:
        """One request admitted from `lease` was settled (its charge is queued)."""
        lease.inflight -= 1
        if lease.closed and lease.inflight == 0:
            self._give_back(lease)

    def close(self, lease: Lease) -> None:
        """No more admissions from `lease`; its release is booked once its last request is settled."""
        if not lease.closed:
            lease.closed = True
            if lease.inflight == 0:
                self._give_back(lease)

    def close_key(self, key_id: str) -> None:
        """Close the leases of a key (revoked through this process)."""
        for k in self._keys.values():
            if k.lease is not None and k.lease.principal.key_id == key_id:
                self.close(k.lease)

    def close_all(self) -> None:
        for k in self._keys.values():
            if k.lease is not None:
                self.close(k.lease)

    def _give_back(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        if self._used is not None and lease.used:
            self._used(lease.used)
        if lease.flags == 0:
            return  # no limit: nothing was counted or reserved
        p = lease.principal
        windowed = lease.flags & 6  # a requests/min or tokens/min limit: the lease was counted in the window
        self._release(
            Charge(
                lease.id,
                lease.ts_ms,
                p.tenant,
                p.key_id or "",
                True,
                lease.reserved,
                0,
                -lease.tokens if windowed else 0,
                lease.minute,
                request_delta=-lease.requests if windowed else 0,
            )
        )

    def _forget_idle(self) -> None:
        # Not a key whose lease is still live, nor one with a lease on its way: its waiters wait on that
        # key's event, which only `answered` of the same key sets.
        idle = [sha for sha, k in self._keys.items() if (k.lease is None or k.lease.released) and k.renewing is None]
        for sha in idle:
            del self._keys[sha]
