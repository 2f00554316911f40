"""The request path of the proxy routes, top to bottom:

    key present? -> read body -> parse -> resolve tier -> admit (metering: key, limits, budget reserve)
    -> [attempt loop: choose backend -> upstream call] -> respond -> settle (metering: book the cost)

The attempt loop retries (same tier) and falls back (next tier in the chain) only while nothing has been
sent to the client; one budget (`retry.max_attempts`) covers both. Once the first byte went out, an upstream
failure ends the stream with an in-band error event.

With metering on, every admitted request is settled exactly once (try/finally), whether it was served,
failed, or lost its client: what reached the client is charged, a reservation for nothing is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import orjson

from gateway.config import backend_key
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable, UpstreamError, envelope
from gateway.exchange import Exchange
from gateway.http import ClientDisconnected, Headers, read_body, request_id, send_error, send_json
from gateway.metering.estimate import completion_tokens_of_body
from gateway.metering.meter import Ticket
from gateway.protocol import Endpoint, ParsedRequest, parse_request
from gateway.routing import Target, choose_backend, target_in
from gateway.runtime import Runtime
from gateway.upstream import SSEFilter, UpstreamResponse

__all__ = ["handle"]

log = logging.getLogger("qlp.gateway")

SSE_HEADERS: Headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _scope_headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    return dict(scope["headers"])


def _response_headers(x: Exchange) -> Headers:
    h: Headers = [(b"x-request-id", x.request_id.encode())]
    if x.tier is not None:
        h.append((b"x-qlp-tier", x.tier.encode()))
    if x.backend is not None:
        h.append((b"x-qlp-backend", f"{x.backend}/{x.model}".encode()))
    return h


async def handle(rt: Runtime, endpoint: Endpoint, scope: dict[str, Any], receive: Any, send: Any) -> Exchange:
    hdrs = _scope_headers(scope)
    x = Exchange(
        request_id=request_id(hdrs.get(b"x-request-id")),
        started=time.perf_counter(),
        endpoint=endpoint,
    )
    meter = rt.meter
    ticket: Ticket | None = None
    req: ParsedRequest | None = None
    try:
        # A missing key is refused before the body is read; the key itself is checked by `admit`.
        auth = meter.authenticate(hdrs.get(b"authorization")) if meter is not None else None
        raw = await read_body(receive, scope["headers"], rt.settings.max_body_bytes)
        req = parse_request(raw, endpoint, max_n=rt.config.max_n, max_tokens_limit=rt.config.max_tokens_limit)
        x.stream = req.stream
        tier_h = hdrs.get(b"x-qlp-tier")
        agent_h = hdrs.get(b"x-qlp-agent")
        wf_h = hdrs.get(b"x-qlp-workflow-id")
        x.agent = agent_h.decode("latin-1")[:64] if agent_h else None
        x.workflow = wf_h.decode("latin-1")[:128] if wf_h else None
        target = rt.resolver.resolve(tier_h.decode("latin-1") if tier_h else None, req.model, x.agent)
        x.requested_tier = target.tier.name
        if rt.rollouts.active:  # the arm, sticky per workflow (gateway/rollout)
            target, x.arm = rt.rollouts.assign(target, req.model, x.agent, x.workflow or x.request_id)
        if rt.capture is not None and rt.capture.wants(x.requested_tier, x.agent):
            x.captured, x.capture_limit = [], rt.capture.config.max_bytes
        if meter is not None and auth is not None:
            ticket = await meter.admit(auth, req, target.tier)
            x.tenant = ticket.principal.tenant
        await _proxy(rt, req, target, x, receive, send)
    except ClientDisconnected:
        x.status = 499
    except GatewayError as exc:
        x.status = exc.status
        # Upstream failures by kind; the gateway's own refusals by code (budget_exceeded,
        # rate_limit_exceeded, invalid_api_key, ...: a fixed set), else by type.
        x.error_kind = exc.code if isinstance(exc, UpstreamError) else (exc.code or exc.type)
        await send_error(send, exc, _response_headers(x))
    finally:
        if ticket is not None and meter is not None:
            priced = meter.settle(ticket, x)
            if priced is not None:  # for the metrics, which read the exchange after this
                x.cost_micros, x.reference_cost_micros = priced
        if x.status == 200 and req is not None:  # after the response: nothing here delays the caller
            if x.captured is not None and rt.capture is not None:
                rt.capture.submit(x, req, b"".join(x.captured))
            if rt.rollouts.shadowing:
                rt.shadow.maybe_mirror(x, req)
    return x


def _collect(x: Exchange, data: bytes) -> None:
    """Keep what was sent for the capture, up to one byte past its limit (which marks it too large)."""
    cap = x.captured
    if cap is not None and x.capture_limit >= 0:
        cap.append(data[: x.capture_limit + 1])
        x.capture_limit -= len(data)


def _backoff(rt: Runtime, retry_no: int) -> float:
    r = rt.config.retry
    return random.uniform(0, min(r.backoff_max, r.backoff_base * (2 ** (retry_no - 1))))


async def _proxy(rt: Runtime, req: ParsedRequest, target: Target, x: Exchange, receive: Any, send: Any) -> None:
    tiers = rt.config.tiers
    chain = [target.tier, *(tiers[name] for name in target.tier.fallback)]
    max_attempts = rt.config.retry.max_attempts
    last: GatewayError | None = None
    first: GatewayError | None = None
    for i, tier in enumerate(chain):
        tgt = target if i == 0 else target_in(tier, req.model, x.agent)
        tried: set[str] = set()
        retries = 0
        retry_after: float | None = None
        while x.attempts < max_attempts:
            now = time.monotonic()
            states = rt.states(tier.name, tier.backends, now)
            backend = choose_backend(tier.backends, states, tier.policy, random.random(), frozenset(tried))
            if backend is None and tried:
                if i + 1 < len(chain):
                    break  # every backend here was tried: the next tier beats waiting on the same one
                # The last tier in the chain: retry a backend already tried, after the backoff.
                backend = choose_backend(tier.backends, states, tier.policy, random.random())
            if backend is None:
                last = last or ServiceUnavailable(
                    f"tier {tier.name} has no healthy backend"
                    if tier.backends
                    else f"tier {tier.name} has no backends",
                    code="no_healthy_backend",
                )
                break
            try:
                call = rt.prepare(tier, backend, tgt.model, req.body, req.endpoint, req.stream, x.request_id)
            except InvalidRequest as exc:
                if i == 0:
                    raise
                last = last or exc
                break  # a fallback whose provider cannot serve or express this request is skipped
            except ServiceUnavailable as exc:
                last = exc
                break
            if retries:
                # Never sooner than the upstream's Retry-After; otherwise jittered exponential backoff.
                await asyncio.sleep(max(_backoff(rt, retries), retry_after or 0.0))
            x.attempts += 1
            if i > 0 and tier.name not in x.fallbacks:
                x.fallbacks.append(tier.name)
            tried.add(backend.name)
            x.tier, x.backend, x.model = tier.name, backend.name, tgt.model
            breaker = rt.breakers[backend_key(tier.name, backend.name)]
            breaker.acquire(now)
            t_up = time.perf_counter()
            try:
                resp = await rt.client.post(call.url, call.body, call.headers, tier.timeouts, call.provider)
            except UpstreamError as exc:
                x.upstream_seconds += time.perf_counter() - t_up
                breaker.release()
                breaker.upstream_failed(exc.kind, time.monotonic())
                if exc.kind == "rejected":
                    raise
                last = exc
                log.warning("upstream %s/%s failed before first byte: %s", tier.name, backend.name, exc.kind)
                if exc.retryable and (exc.retry_after or 0) <= rt.config.retry.max_retry_after:
                    retries += 1
                    retry_after = exc.retry_after
                    continue
                break  # not retryable within this tier: fall back
            try:
                done = await _respond(rt, req, x, resp, breaker, t_up, receive, send)
            finally:
                resp.close()
                breaker.release()
            if done:
                return
            last = UpstreamError(
                "upstream failed before sending a response", kind=x.error_kind or "protocol", retryable=False
            )
            break
        if i == 0:
            first = last
        if x.attempts >= max_attempts:
            break
    # The caller asked for the first tier: its failure is the one to report; fallbacks' failures are logged.
    raise first or last or ServiceUnavailable("no upstream attempt was possible", code="no_healthy_backend")


async def _respond(
    rt: Runtime,
    req: ParsedRequest,
    x: Exchange,
    resp: UpstreamResponse,
    breaker: Any,
    t_up: float,
    receive: Any,
    send: Any,
) -> bool:
    """Relay one 2xx upstream response. False: it failed before anything reached the client (fall back)."""
    if not req.stream:
        try:
            data = await resp.read()
        except UpstreamError as exc:
            x.upstream_seconds += time.perf_counter() - t_up
            breaker.failure(time.monotonic())
            x.error_kind = exc.kind
            return False
        x.upstream_seconds += time.perf_counter() - t_up
        breaker.success()
        x.status = 200
        x.first_byte_at = time.perf_counter()
        try:
            parsed = orjson.loads(data)
            x.usage = parsed.get("usage") if isinstance(parsed, dict) else None
            if x.usage is None:
                x.output_estimate = completion_tokens_of_body(parsed)
        except orjson.JSONDecodeError:
            x.output_estimate = max(1, len(data) // 4)
        await send_json(send, resp.status, data, _response_headers(x))
        if x.captured is not None:
            _collect(x, data)
        return True

    sse = SSEFilter(strip_usage=not req.client_wants_usage)
    chunks = resp.chunks()
    # Wait for the first chunk before committing to this upstream: until then a failure can fall back.
    try:
        first = await anext(chunks)
    except (UpstreamError, StopAsyncIteration) as exc:
        x.upstream_seconds += time.perf_counter() - t_up
        breaker.failure(time.monotonic())
        x.error_kind = exc.kind if isinstance(exc, UpstreamError) else "empty_stream"
        return False
    breaker.success()
    x.status = 200
    x.first_byte_at = time.perf_counter()
    await _relay_stream(x, resp, sse, first, chunks, receive, send)
    x.upstream_seconds += time.perf_counter() - t_up
    return True


async def _watch_disconnect(receive: Any, resp: UpstreamResponse, gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            resp.close()  # unblocks the relay's read at once and frees the upstream
            return


async def _relay_stream(
    x: Exchange, resp: UpstreamResponse, sse: SSEFilter, first: bytes, chunks: Any, receive: Any, send: Any
) -> None:
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, resp, gone))
    try:
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *_response_headers(x)]})
        capturing = x.captured is not None
        out = sse.feed(first)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
            if capturing:
                _collect(x, out)
        error: UpstreamError | None = None
        try:
            async for chunk in chunks:
                out = sse.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    if capturing:
                        _collect(x, out)
        except UpstreamError as exc:
            error = exc
        if gone.is_set():
            # A client that hung up after `[DONE]` reached it had the whole answer (some close at once).
            x.status = 200 if sse.done else 499
            return
        tail = sse.tail()
        if tail.strip() and not tail.endswith(b"\n\n"):
            tail = b""  # a half event from a dying upstream is not forwarded
        if not sse.done and error is None:
            error = UpstreamError("upstream ended the stream early", kind="stream_truncated", retryable=False)
        if error is not None:
            x.error_kind = error.kind
            x.status = 502
            log.warning("stream from %s/%s broke: %s", x.tier, x.backend, error.kind)
            tail += b"data: " + envelope(error.message, error.type, None, error.kind) + b"\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    except OSError:
        x.status = 499  # the client went away while we were sending
    finally:
        x.usage = sse.usage
        if sse.usage is None:
            # No usage chunk (the upstream sent none, the stream broke, or the client left): about one
            # token per content event relayed, so what was produced is charged, never zero.
            x.output_estimate = max(1, sse.events)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
