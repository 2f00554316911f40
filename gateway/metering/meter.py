"""The meter: what the request path calls. `admit` before the upstream call, `settle` after it.

    authenticate(header)  local: 401 for a missing key; the bootstrap admin key is recognised here
    admit(...)            one Redis round trip (ADMIT): key, revocation, requests/min, tokens/min, and a
                          reservation of the worst case against the key's budgets; none for a busy key
                          whose lease covers the request (lease.py)
    settle(ticket, x)     prices the request and queues its charge (one CHARGE call per key and batch); queued charges
                          go out with the next admission's write, or on their own within 10 ms: one round
                          trip after the response, off the request's path. Never raises; when Redis is
                          unreachable a served request's charge goes to the spool (fsync) and is replayed
                          later.

Redis down: admission fails closed (503) or open (keys seen in the last minutes, up to a per-process cap
per outage), per `admission_when_redis_down`. Booking, the spool and its replay: booking.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config import FleetConfig, Tier
from gateway.errors import AuthenticationError, GatewayError, RateLimited, ServiceUnavailable
from gateway.metering import estimate
from gateway.metering.booking import UNAVAILABLE, Booker, Health
from gateway.metering.cluster import open_pipe
from gateway.metering.keys import Credential, KeyStore, Principal, bearer, digest
from gateway.metering.layout import ADMIN_KEY_ID
from gateway.metering.lease import Lease, Leases
from gateway.metering.ledger import SEP, AdmitResult, Charge, Ledger, LedgerPolicy
from gateway.metering.pricing import ModelPrice, Pricing, Tokens, tokens_from_usage
from gateway.metering.spool import Spool
from gateway.metering.target import parse_redis_url
from gateway.protocol import ParsedRequest
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.metrics import Metrics

__all__ = ["UNAVAILABLE", "Meter", "Ticket", "connect"]

log = logging.getLogger("qlp.metering")

KNOWN_KEY_SECONDS = 600.0  # how long a verified key may be admitted without Redis (fail open)
AUTH_CACHE_SIZE = 4096  # header values whose credential is kept (the cache is emptied when full)


def connect(settings: Settings) -> Redis:
    """A pooled asyncio client for key admin and ledger reads, of whatever kind `QLP_REDIS_URL` names: one
    server, a Redis Cluster (redis-py's `RedisCluster`, which follows MOVED and failovers itself), or the
    master a Sentinel names. One immediate retry on a broken connection (a pooled connection that died
    with a restarted server); none on a timeout, so a hung Redis costs one `redis_timeout`, not several.
    Retrying is safe: the charge scripts are idempotent and ADMIT does not reserve twice."""
    t = settings.redis_timeout
    target = parse_redis_url(settings.redis_url)
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "socket_timeout": t,
        "socket_connect_timeout": t,
        "username": target.username,
        "password": target.password,
    }
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.nodes]
        cluster = RedisCluster(startup_nodes=nodes, ssl=target.tls, **common)
        return cast(Redis, cluster)  # the commands the gateway uses have the same signatures
    if target.kind == "sentinel":
        assert target.service is not None
        sentinel = Sentinel(
            list(target.nodes), sentinel_kwargs={"password": target.sentinel_password, "socket_timeout": t}, **common
        )
        return cast(Redis, sentinel.master_for(target.service, db=target.db, retry=retry))
    return Redis.from_url(settings.redis_url, socket_timeout=t, socket_connect_timeout=t, retry=retry)


@dataclass(slots=True)
class Ticket:
    """An admitted request, until it is settled."""

    charge_id: str
    ts_ms: int
    principal: Principal
    prompt_estimate: int
    window_tokens: int  # tokens counted in the rate window at admission (corrected at settle)
    minute: int
    key_state: bool = True  # the key has a budget or a tokens/min limit to correct (unknown: True)
    reserved: int = 0  # micro-dollars reserved against the key's budgets
    lease: Lease | None = None  # admitted from this lease (its reservation covers the request)


class Meter:
    def __init__(
        self, settings: Settings, config: FleetConfig, pricing: Pricing, metrics: Metrics | None = None
    ) -> None:
        pricing.check(config)
        self.settings = settings
        self.config = config
        self.pricing = pricing
        admin = settings.secret("admin_key")
        if admin and len(admin) < 24 and settings.environment != "development":
            raise ValueError("the admin key is too short: use `qlp keys`-style random keys (32+ characters)")
        self._admin_sha = digest(admin) if admin else None
        self._worst = {name: pricing.worst(config, name) for name in config.tiers}
        self._prices: dict[tuple[str, str | None], ModelPrice] = {}
        longest = max((t.timeouts.total for t in config.tiers.values()), default=900.0)
        self._reservation_ttl_ms = int((longest * config.retry.max_attempts + 60) * 1000)
        self.redis = connect(settings)  # key admin and ledger reading
        self.pipe = open_pipe(settings.redis_url, settings.redis_timeout)  # the request path
        # Charges that WAIT for replicas get connections of their own (Ledger.book_pipe).
        self.book_pipe = (
            open_pipe(settings.redis_url, settings.redis_timeout) if settings.redis_wait_replicas else self.pipe
        )
        self.ledger = Ledger(
            self.pipe,
            LedgerPolicy(
                settings.ledger_stream_maxlen,
                settings.ledger_days,
                settings.idempotency_days,
                settings.request_index_days,
                settings.redis_wait_replicas,
                max(1, int(settings.redis_timeout * 1000 / 2)),
            ),
            self.book_pipe,
        )
        self.keys = KeyStore(self.redis)
        self.spool = Spool(settings.spool_path)
        self.health = Health(settings.spool_path, self._redis_back)
        self.booker = Booker(self.ledger, self.spool, self.health)
        self.metrics = metrics
        self.leases = (
            Leases(settings.admission_lease_seconds, self.booker.queue, self._renew, lambda n: self._count("lease", n))
            if settings.admission_lease_seconds > 0
            else None
        )
        self._tasks: set[asyncio.Task[None]] = set()  # lease renewals
        self._credentials: dict[bytes | str | None, Credential | Principal] = {}
        self._id_prefix = os.urandom(8).hex()  # charge and lease ids: unique per process, then a counter
        self._ids = itertools.count()
        self.open_admitted = 0
        self._known: dict[str, tuple[Principal, float]] = {}
        self._replayer: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.health.up

    def _redis_back(self) -> None:
        self.open_admitted = 0  # the fail-open cap counts per outage

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.ledger.load_scripts()
            self.health.mark_up()
        except UNAVAILABLE as exc:
            self.health.mark_down(exc)
            log.warning(
                "Redis at %s is unreachable at start-up; admission is %s until it answers",
                _safe_url(self.settings.redis_url),
                self.settings.admission_when_redis_down,
            )
        self._replayer = asyncio.create_task(
            self.booker.replay_loop(self.settings.spool_replay_interval), name="qlp-spool-replayer"
        )

    async def stop(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.leases is not None:
            self.leases.close_all()  # give back what was leased and not used
        await self.booker.drain()
        self.pipe.close()
        if self.book_pipe is not self.pipe:
            self.book_pipe.close()
        with contextlib.suppress(*UNAVAILABLE):
            await self.redis.aclose()

    # -- identity --------------------------------------------------------------------------------------
    def authenticate(self, header: bytes | str | None) -> Credential | Principal:
        """Local checks only: the key's presence and the bootstrap admin key. 401 when absent. The result
        depends on the header alone, so it is kept per header value (a bounded cache: no hashing per request)."""
        known = self._credentials.get(header)
        if known is not None:
            return known
        auth = self._authenticate(header)
        if len(self._credentials) >= AUTH_CACHE_SIZE:
            self._credentials.clear()
        self._credentials[header] = auth
        return auth

    def _authenticate(self, header: bytes | str | None) -> Credential | Principal:
        key = bearer(header)
        if key is None:
            raise AuthenticationError("no API key provided: send 'Authorization: Bearer <key>'", code="missing_api_key")
        cred = Credential.of(key)
        if self._admin_sha is not None and hmac.compare_digest(cred.sha256, self._admin_sha):
            return Principal("admin", "admin", None)
        return cred

    async def principal(self, header: bytes | str | None) -> Principal:
        """The caller of a non-proxy route (ledger, admin): one Redis read; no limits apply."""
        auth = self.authenticate(header)
        if isinstance(auth, Principal):
            return auth
        try:
            info = await self.keys.lookup(auth)
        except UNAVAILABLE as exc:
            raise ServiceUnavailable("the ledger store is unreachable", code="ledger_unavailable") from exc
        if info is None or info.revoked:
            raise AuthenticationError("invalid API key")
        return Principal(info.tenant, info.role, info.id)

    # -- admission -------------------------------------------------------------------------------------
    async def admit(self, auth: Credential | Principal, req: ParsedRequest, tier: Tier) -> Ticket:
        now_ms = time.time_ns() // 1_000_000
        minute = now_ms // 60_000
        charge_id = self._new_id()
        prompt = estimate.prompt_tokens(req)
        max_out = min(req.max_tokens or tier.max_tokens_default, self.config.max_tokens_limit) * req.n
        if isinstance(auth, Principal):  # the bootstrap admin key: no record, no limits
            return Ticket(charge_id, now_ms, auth, prompt, 0, minute, key_state=False)
        worst_tokens = prompt + max_out
        worst = self._worst[tier.name].plain(prompt, max_out)
        leases = self.leases
        wanted = 1
        if leases is not None:
            lease = leases.take(auth.sha256, worst, worst_tokens, minute)
            if lease is None and (pending := leases.pending(auth.sha256)) is not None:
                await pending.wait()  # the key's next lease is on its way: wait for it (one shared round trip)
                lease = leases.take(auth.sha256, worst, worst_tokens, minute, count=False)
            if lease is not None:  # no round trip: the lease's reservation covers this request
                return Ticket(
                    charge_id,
                    now_ms,
                    lease.principal,
                    prompt,
                    worst_tokens,
                    minute,
                    key_state=lease.flags != 0,
                    lease=lease,
                )
            wanted = leases.wanted(auth.sha256)
        try:
            if self.health.usable():
                lease_id = "L" + charge_id if wanted > 1 else charge_id
                r = await self._ask(auth, lease_id, worst, worst_tokens, now_ms, wanted)
                if r is not None:
                    self._count("redis")
                    if r.code != 0:
                        raise _rejection(r)
                    p = self._principal_of(auth, r)
                    self._remember(auth, p)
                    if wanted > 1 and leases is not None:
                        lease = leases.granted(
                            auth.sha256, lease_id, p, r.flags, now_ms, r.granted, worst, worst_tokens, taken=1
                        )
                        return Ticket(
                            charge_id, now_ms, p, prompt, worst_tokens, minute, key_state=r.flags != 0, lease=lease
                        )
                    return Ticket(
                        charge_id,
                        now_ms,
                        p,
                        prompt,
                        worst_tokens,
                        minute,
                        key_state=r.flags != 0,
                        reserved=worst if r.flags & 1 else 0,
                    )
        finally:
            if wanted > 1 and leases is not None:
                leases.answered(auth.sha256)
        return self._admit_without_redis(auth, charge_id, now_ms, prompt, minute)

    def _new_id(self) -> str:
        """A charge (or, prefixed, lease) id: unique per process by its counter, across processes by its prefix."""
        return f"{self._id_prefix}{next(self._ids):x}"

    async def _ask(
        self, cred: Credential, ident: str, worst: int, worst_tokens: int, now_ms: int, wanted: int
    ) -> AdmitResult | None:
        """One admission (or lease, `wanted` > 1) from Redis; None when Redis is unreachable."""
        try:
            r = await self.ledger.admit(
                cred.sha256, cred.key_id, ident, worst, worst_tokens, now_ms, self._reservation_ttl_ms, wanted
            )
        except UNAVAILABLE as exc:
            self.health.mark_down(exc)
            return None
        self.health.mark_up()
        return r

    @staticmethod
    def _principal_of(cred: Credential, r: AdmitResult) -> Principal:
        return Principal(r.tenant, "admin" if r.role == "admin" else "user", cred.key_id)

    def _renew(self, sha256: str, lease: Lease, wanted: int) -> None:
        """Ask for a key's next lease in the background (its current one is running out)."""
        task = asyncio.get_running_loop().create_task(self._renewal(Credential(sha256), lease, wanted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renewal(self, cred: Credential, old: Lease, wanted: int) -> None:
        assert self.leases is not None
        try:
            if self.health.usable():
                now_ms = time.time_ns() // 1_000_000
                lease_id = "L" + self._new_id()
                r = await self._ask(cred, lease_id, old.unit_micros, old.unit_tokens, now_ms, -wanted)
                if r is not None and r.code == 0:  # refused or not worth it: the next request asks for itself
                    self.leases.granted(
                        cred.sha256,
                        lease_id,
                        self._principal_of(cred, r),
                        r.flags,
                        now_ms,
                        r.granted,
                        old.unit_micros,
                        old.unit_tokens,
                        taken=0,
                    )
        except Exception:  # never lost silently; requests fall back to their own admission
            log.exception("lease renewal failed")
        finally:
            self.leases.answered(cred.sha256)

    def _count(self, how: str, n: int = 1) -> None:
        """qlp_admissions_total: how admissions were decided (leases report once each, when given back)."""
        if self.metrics is not None:
            from gateway.metrics import child  # the metrics module is only needed when counting

            child(self.metrics, self.metrics.admissions, how).inc(n)

    def _remember(self, cred: Credential, p: Principal) -> None:
        if self.settings.admission_when_redis_down == "open":
            if len(self._known) > 100_000:
                self._known.clear()
            self._known[cred.sha256] = (p, time.monotonic() + KNOWN_KEY_SECONDS)

    def _admit_without_redis(self, cred: Credential, charge_id: str, now_ms: int, prompt: int, minute: int) -> Ticket:
        if self.settings.admission_when_redis_down == "closed":
            raise ServiceUnavailable(
                "the usage ledger is unreachable; try again shortly",
                code="ledger_unavailable",
                headers={"Retry-After": "1"},
            )
        known = self._known.get(cred.sha256)
        if known is None or known[1] < time.monotonic():
            raise ServiceUnavailable(
                "the usage ledger is unreachable and this key cannot be verified without it",
                code="ledger_unavailable",
                headers={"Retry-After": "1"},
            )
        if self.open_admitted >= self.settings.fail_open_cap:
            raise ServiceUnavailable(
                "the usage ledger is unreachable and this process admitted all it may without it",
                code="ledger_unavailable",
                headers={"Retry-After": "1"},
            )
        self.open_admitted += 1
        self._count("without_redis")
        return Ticket(charge_id, now_ms, known[0], prompt, 0, minute)

    # -- settlement ------------------------------------------------------------------------------------
    def settle(self, ticket: Ticket, x: Exchange) -> tuple[int, int] | None:
        """Book what was served (or release the reservation). Call exactly once per ticket; never raises.
        The charge is queued and booked right after, together with those of concurrent requests.
        Returns (cost, the reference model's cost) in micro-dollars when something was served."""
        priced = None
        try:
            charge = self.charge(ticket, x)
        except Exception:  # a bug here must not break the response that was already sent
            log.exception("could not price request %s", x.request_id)
        else:
            if charge.record is not None:
                priced = charge.cost_micros, int(charge.record["reference_cost_micros"])
            if charge.record is not None or charge.key_state:  # else: nothing served, no limit state to correct
                self.booker.queue(charge)
        if ticket.lease is not None and self.leases is not None:
            self.leases.settled(ticket.lease)  # after the charge: a lease's release is booked after its requests
        return priced

    async def drain(self) -> None:
        """Book every queued charge now (shutdown; tests that read the ledger at once)."""
        await self.booker.drain()

    def charge(self, ticket: Ticket, x: Exchange) -> Charge:
        p = ticket.principal
        key_id = p.key_id or ADMIN_KEY_ID
        if x.first_byte_at is None or x.tier is None:  # nothing reached the client: release only
            return Charge(
                ticket.charge_id,
                ticket.ts_ms,
                p.tenant,
                key_id,
                ticket.key_state,
                ticket.reserved,
                0,
                -ticket.window_tokens,
                ticket.minute,
            )
        toks = tokens_from_usage(x.usage)
        estimated = toks is None
        if toks is None:
            toks = Tokens(ticket.prompt_estimate, max(1, x.output_estimate or 1))
        cost, reference_cost = self._price(x.tier, x.model).cost(toks), self.pricing.reference.cost(toks)
        record: dict[str, Any] = {
            "id": ticket.charge_id,
            "request_id": x.request_id,
            "ts": ticket.ts_ms,
            "tenant": p.tenant,
            "key_id": p.key_id,
            "workflow": x.workflow,
            "agent": x.agent,
            "arm": x.arm,
            "tier": x.tier,
            "requested_tier": x.requested_tier,
            "backend": x.backend,
            "model": x.model,
            "endpoint": x.endpoint,
            "stream": x.stream,
            "prompt_tokens": toks.prompt,
            "completion_tokens": toks.completion,
            "cached_tokens": toks.cached,
            "cost_micros": cost,
            "reference_cost_micros": reference_cost,
            "reference_model": self.pricing.reference_model,
            "latency_ms": round((time.perf_counter() - x.started) * 1000),
            "status": x.status,
            "estimated": estimated,
            "attempts": x.attempts,
            "fallback": [t for t in (x.requested_tier, *x.fallbacks) if t],
        }
        parts = (x.tier, f"{x.backend}/{x.model}", x.agent or "", x.workflow or "")
        group = SEP.join(parts)
        if group.count(SEP) != 3:  # a separator inside a value (agent and workflow come from headers)
            group = SEP.join([v.replace(SEP, " ") for v in parts])
        return Charge(
            ticket.charge_id,
            ticket.ts_ms,
            p.tenant,
            key_id,
            ticket.key_state,
            ticket.reserved,
            cost,
            toks.prompt + toks.completion - ticket.window_tokens,
            ticket.minute,
            record,
            group,
        )

    def _price(self, tier: str, model: str | None) -> ModelPrice:
        """The price of `model` on `tier`, kept per pair (models come from the fleet config: few)."""
        price = self._prices.get((tier, model))
        if price is None:
            if len(self._prices) >= 1024:
                self._prices.clear()
            price = self._prices[(tier, model)] = self.pricing.price(self.config.tiers[tier], model)
        return price

    # -- readiness ---------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        try:
            await self.pipe.call("PING")
            self.health.mark_up()
        except UNAVAILABLE as exc:
            self.health.mark_down(exc)
        mode = self.settings.admission_when_redis_down
        return {
            "redis": "up" if self.up else "down",
            "admission_when_redis_down": mode,
            "spool_depth": await asyncio.to_thread(self.spool.depth),
            "admitted_without_redis": self.open_admitted,
            "ready": self.up or mode == "open",
        }


def _rejection(r: AdmitResult) -> GatewayError:
    code, retry_after, period = r.code, r.retry_after, r.period
    if code in (1, 2):
        return AuthenticationError("invalid API key" if code == 1 else "this API key was revoked")
    if code == 3:
        return RateLimited(
            "requests per minute limit reached for this API key", headers={"Retry-After": str(retry_after)}
        )
    if code == 4:
        return RateLimited(
            "tokens per minute limit reached for this API key", headers={"Retry-After": str(retry_after)}
        )
    which = "daily" if period == "day" else "monthly"
    if r.held:  # the spend leaves room: the worst case of requests in flight (or leased) is what holds it
        return RateLimited(
            f"the {which} budget of this API key is held by requests in flight (their worst case is "
            "reserved until they finish); retry in a moment",
            code="budget_exceeded",
            headers={"Retry-After": "1"},
        )
    # Spent: the period's end is when it frees up (Retry-After), no retry within the SDK's patience helps.
    return RateLimited(
        f"the {which} budget of this API key is spent",
        code="budget_exceeded",
        headers={"Retry-After": str(retry_after)},
        should_retry=False,
    )


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]
