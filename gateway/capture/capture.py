"""Capture: served exchanges of chosen tiers and agents, redacted, into one Redis stream per agent.

Capture is best effort and stays off the request path: `submit` (called after the response was sent) only
snapshots the exchange into a bounded queue; a background task drains it every `FLUSH_INTERVAL` (or at
`BATCH` records), does the CPU work of a batch (response parsing, redaction, JSON) in a worker thread so a
large prompt does not stall the event loop, and writes the batch in one pipelined round trip:

    XADD qlp:capture:<agent> MAXLEN ~ <maxlen> * r <record JSON>     (for each record, in one script per stream)

Nothing here can fail a request. A full queue drops (`qlp_capture_total{outcome="dropped"}`), Redis down
drops the batch (`failed`, logged once per outage), an exchange past `max_bytes` is not captured
(`too_large`), an exchange with no reply text (only tool calls, a cut stream, an in-band error) is
skipped (`failed`). Billing has its own path (metering, with a spool); capture never waits for it.

Assumption: `submit`, `start`, `stop` and `flush` are called on the gateway's event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.capture.config import CaptureConfig
from gateway.capture.record import Pending, build_record
from gateway.capture.redact import Redactor

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.metrics import Metrics
    from gateway.protocol import ParsedRequest

__all__ = ["AGENT_RE", "BATCH", "FLUSH_INTERVAL", "QUEUE_MAX", "Capture", "Pending", "stream_key"]

log = logging.getLogger("qlp.capture")

QUEUE_MAX = 10_000  # exchanges waiting for the flusher; past it new ones are dropped and counted
BATCH = 64  # records per pipelined write; also wakes the flusher early
FLUSH_INTERVAL = 0.05  # seconds between a first queued exchange and its write
INLINE_BYTES = 32_768  # a batch whose responses add up to less is prepared on the event loop
STREAM_PREFIX = "qlp:capture:"
# The agent becomes part of a Redis key: a bounded, plain alphabet keeps key names and SCAN patterns sane.
AGENT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


# XADD each record (ARGV[2..]) to the stream KEYS[1], trimmed to about ARGV[1] entries.
APPEND = """
for i = 2, #ARGV do redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[i]) end
return #ARGV - 1
"""


def _prompt_chars(body: dict[str, Any]) -> int:
    """About how much text the redaction will scan in the request (string contents and prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(len(c) if isinstance(c := m.get("content"), str) else 4096 for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, str) else 4096


def stream_key(agent: str) -> str:
    return STREAM_PREFIX + agent


class Capture:
    def __init__(
        self, config: CaptureConfig, redis: Redis, secrets: tuple[str, ...] = (), metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.redis = redis
        self.secrets = secrets
        self.metrics = metrics
        self.redactor = Redactor(config.redact, secrets)
        # tier -> agents (None: every agent): `wants` is one dict lookup and one set lookup.
        self._targets: dict[str, frozenset[str] | None] = {
            t: (None if "*" in agents else frozenset(agents)) for t, agents in config.targets.items() if agents
        }
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._redis_down = False
        self._append = redis.register_script(APPEND)

    def wants(self, tier: str, agent: str | None) -> bool:
        if agent is None or tier not in self._targets:
            return False
        agents = self._targets[tier]
        return agents is None or agent in agents

    def _count(self, tier: str | None, outcome: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            from gateway.metrics import child  # the metrics module is only needed when counting

            child(self.metrics, self.metrics.capture, tier or "", outcome).inc(n)

    def submit(self, x: Exchange, req: ParsedRequest, response: bytes) -> None:
        """Queue one served exchange (never raises, never blocks)."""
        try:
            tier = x.tier or x.requested_tier
            if len(response) > self.config.max_bytes:
                self._count(tier, "too_large")
                return
            if x.agent is None or not AGENT_RE.fullmatch(x.agent):
                self._count(tier, "failed")
                return
            if len(self._queue) >= QUEUE_MAX:
                self._count(tier, "dropped")
                return
            now = time.time()
            self._queue.append(
                Pending(
                    x.request_id,
                    now,
                    int((time.perf_counter() - x.started) * 1000),
                    x.endpoint,
                    x.stream,
                    x.tier,
                    x.requested_tier,
                    x.backend,
                    x.model,
                    x.agent,
                    x.workflow,
                    x.tenant,
                    x.arm,
                    dict(x.usage) if x.usage else None,
                    req.body,
                    response,
                )
            )
            self._wake.set()
            if len(self._queue) >= BATCH:
                self._full.set()
        except Exception:  # capture must never fail a request
            log.exception("capture: submit failed")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="qlp-capture")

    async def stop(self) -> None:
        """Stop the flusher and write what is queued (Redis permitting)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.flush()

    async def flush(self) -> None:
        """Write everything queued now (waits for a write in progress)."""
        async with self._lock:
            while self._queue:
                batch, self._queue = self._queue[: BATCH * 16], self._queue[BATCH * 16 :]
                await self._write(batch)
            self._full.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._queue) < BATCH:
                try:
                    await asyncio.wait_for(self._full.wait(), FLUSH_INTERVAL)
                except TimeoutError:
                    pass
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end capture for the life of the process
                log.exception("capture: flush failed")

    def _prepare(self, batch: list[Pending]) -> tuple[list[tuple[str, bytes, str]], dict[tuple[str, str], int]]:
        """CPU work of a batch (runs in a worker thread): records built, redacted and serialised."""
        out: list[tuple[str, bytes, str]] = []
        skipped: dict[tuple[str, str], int] = {}
        for p in batch:
            tier = p.tier or p.requested_tier or ""
            try:
                rec = build_record(p, self.redactor)
            except Exception:
                log.exception("capture: cannot build the record of request %s", p.request_id)
                rec = None
            data = orjson.dumps(rec) if rec is not None else b""
            outcome = "failed" if rec is None else "too_large" if len(data) > self.config.max_bytes else None
            if outcome is not None:
                skipped[(tier, outcome)] = skipped.get((tier, outcome), 0) + 1
                continue
            out.append((stream_key(p.agent), data, tier))
        return out, skipped

    async def _write(self, batch: list[Pending]) -> None:
        # A batch of short exchanges is prepared in the loop (tens of microseconds each); a big one in a worker
        # thread, so that a long prompt does not stall the requests being served.
        size = sum(len(p.response) + _prompt_chars(p.body) for p in batch)
        rows, skipped = self._prepare(batch) if size <= INLINE_BYTES else await asyncio.to_thread(self._prepare, batch)
        for (tier, outcome), n in skipped.items():
            self._count(tier, outcome, n)
        if not rows:
            return
        by_key: dict[str, list[bytes]] = {}
        for key, data, _ in rows:
            by_key.setdefault(key, []).append(data)
        try:
            # One script call per agent stream, not one XADD per record: redis-py spends more time packing
            # a command than Redis spends running it (measured: bench/bench_learning.py).
            await asyncio.gather(
                *(
                    self._append(keys=[key], args=[self.config.maxlen, *datas], client=self.redis)
                    for key, datas in by_key.items()
                )
            )
        except (RedisError, OSError) as exc:
            if not self._redis_down:
                log.warning("capture: Redis unreachable, dropping captured exchanges until it is back: %s", exc)
                self._redis_down = True
            for _, _, tier in rows:
                self._count(tier, "failed")
            return
        if self._redis_down:
            log.warning("capture: Redis is back; capturing again")
            self._redis_down = False
        for _, _, tier in rows:
            self._count(tier, "captured")
