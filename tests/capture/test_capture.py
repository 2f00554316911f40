"""The Capture itself, against a real Redis: what is written, what is refused and counted, what is bounded,
and that nothing it does can fail or hold up a request."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.capture.capture import QUEUE_MAX, Capture, stream_key
from gateway.capture.config import CaptureConfig
from gateway.capture.record import reply_text
from gateway.exchange import Exchange
from gateway.metrics import Metrics
from gateway.protocol import ParsedRequest
from tests.capture.conftest import planted
from tests.fakes.upstream import chunk, completion

CFG = CaptureConfig(targets={"T0": ("developer",), "T3": ("*",)}, maxlen=100, max_bytes=4096)


def exchange(agent: str | None = "developer", stream: bool = False, endpoint: str = "chat", **over: Any) -> Exchange:
    x = Exchange(
        request_id=over.pop("request_id", f"r-{time.monotonic_ns()}"),
        started=time.perf_counter() - 0.25,
        endpoint=endpoint,
        stream=stream,
    )  # type: ignore[arg-type]
    x.tier = x.requested_tier = "T0"
    x.backend, x.model, x.agent, x.workflow, x.tenant, x.status = "a", "m0", agent, "wf-1", "acme", 200
    x.usage = {"prompt_tokens": 5, "completion_tokens": 3}
    for k, v in over.items():
        setattr(x, k, v)
    return x


def request(body: dict[str, Any], endpoint: str = "chat") -> ParsedRequest:
    return ParsedRequest(endpoint, body, body.get("model"), bool(body.get("stream")), 1, None, False)  # type: ignore[arg-type]


def chat_body(content: str = "hi") -> dict[str, Any]:
    return {"model": "qlp-t0", "messages": [{"role": "user", "content": content}]}


def sse(*pieces: str, done: bool = True) -> bytes:
    out = chunk("m0", {"role": "assistant", "content": ""})
    out += b"".join(chunk("m0", {"content": p}) for p in pieces) + chunk("m0", {}, "stop")
    return out + (b"data: [DONE]\n\n" if done else b"")


def counts(m: Metrics) -> dict[tuple[str, str], float]:
    return {
        (s.labels["tier"], s.labels["outcome"]): s.value
        for metric in m.capture.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


async def entries(r: Redis, agent: str = "developer") -> list[dict[str, Any]]:
    got: Any = await r.xrange(stream_key(agent))
    return [json.loads(f[b"r"]) for _, f in got]


@pytest.fixture
async def r(redis_url: str) -> Any:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def test_a_served_exchange_becomes_one_redacted_record(r: Redis) -> None:
    m = metrics()
    cap = Capture(CFG, r, secrets=("backend-secret-value-1",), metrics=m)
    body = {
        "model": "qlp-t0",
        "messages": [
            {"role": "system", "content": "backend-secret-value-1 is the key"},
            {
                "role": "user",
                "content": [{"type": "text", "text": planted()}, {"type": "image_url", "image_url": {"url": "x"}}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"token": "CANARYtc"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
    }
    x = exchange()
    cap.submit(x, request(body), orjson.dumps(completion("m0", "the answer, sk-proj-CANARYechoedabcdefghijklmnop")))
    await cap.flush()
    [rec] = await entries(r)
    raw = json.dumps(rec)
    assert "CANARY" not in raw and "backend-secret-value-1" not in raw
    assert rec["response"] == "the answer, [REDACTED]"
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "tool"]
    assert all(isinstance(m["content"], str) for m in rec["messages"])
    assert rec["messages"][2]["tool_calls"][0]["function"]["name"] == "f"
    assert {
        k: rec[k]
        for k in (
            "request_id",
            "tenant",
            "tier",
            "requested_tier",
            "agent",
            "workflow",
            "backend",
            "model",
            "endpoint",
            "stream",
            "outcome",
        )
    } == {
        "request_id": x.request_id,
        "tenant": "acme",
        "tier": "T0",
        "requested_tier": "T0",
        "agent": "developer",
        "workflow": "wf-1",
        "backend": "a",
        "model": "m0",
        "endpoint": "chat",
        "stream": False,
        "outcome": None,
    }
    assert rec["usage"] == {"prompt_tokens": 5, "completion_tokens": 3}
    assert 250 <= rec["latency_ms"] < 10_000
    assert rec["time"].endswith("Z") and abs(rec["ts"] - time.time() * 1000) < 60_000
    assert counts(m) == {("T0", "captured"): 1}


async def test_stream_reply_is_the_concatenated_deltas(r: Redis) -> None:
    cap = Capture(CFG, r)
    cap.submit(exchange(stream=True), request({**chat_body(), "stream": True}), sse("Hel", "lo ", "wörld"))
    await cap.flush()
    [rec] = await entries(r)
    assert rec["response"] == "Hello wörld" and rec["stream"] is True and rec["finish_reason"] == "stop"


async def test_text_completion_prompt_becomes_a_user_turn(r: Redis) -> None:
    cap = Capture(CFG, r)
    doc = {"object": "text_completion", "choices": [{"index": 0, "text": " world", "finish_reason": "stop"}]}
    cap.submit(exchange(endpoint="completions"), request({"prompt": "hello"}, "completions"), orjson.dumps(doc))
    cap.submit(exchange(endpoint="completions"), request({"prompt": ["a", "b"]}, "completions"), orjson.dumps(doc))
    await cap.flush()
    [rec] = await entries(r)
    assert rec["messages"] == [{"role": "user", "content": "hello"}] and rec["response"] == " world"


@pytest.mark.parametrize(
    "response",
    [
        sse("partial", done=False),  # cut before [DONE]
        sse("a").replace(b"data: [DONE]", b'data: {"error": {"message": "upstream died"}}\n\ndata: [DONE]'),
        orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": []}}]}),
        b"not json",
    ],
)
async def test_exchanges_without_a_whole_reply_are_skipped_and_counted(r: Redis, response: bytes) -> None:
    m = metrics()
    cap = Capture(CFG, r, metrics=m)
    cap.submit(exchange(stream=response.startswith(b"data:")), request(chat_body()), response)
    await cap.flush()
    assert await entries(r) == [] and counts(m) == {("T0", "failed"): 1}


async def test_too_large_exchanges_are_not_captured_and_counted(r: Redis) -> None:
    m = metrics()
    cap = Capture(CFG, r, metrics=m)
    cap.submit(exchange(), request(chat_body()), orjson.dumps(completion("m0", "x" * 5000)))  # response too big
    cap.submit(exchange(), request(chat_body("y" * 5000)), orjson.dumps(completion("m0", "ok")))  # record too big
    await cap.flush()
    assert await entries(r) == [] and counts(m) == {("T0", "too_large"): 2}


async def test_agents_that_cannot_name_a_key_are_not_captured(r: Redis) -> None:
    m = metrics()
    cap = Capture(CFG, r, metrics=m)
    for agent in ("dev*", "a b", "x" * 65, "dev:x", None):
        cap.submit(exchange(agent=agent), request(chat_body()), orjson.dumps(completion("m0", "ok")))
    await cap.flush()
    assert [k async for k in r.scan_iter("qlp:capture:*")] == [] and counts(m) == {("T0", "failed"): 5}


async def test_retention_keeps_each_agent_stream_bounded(r: Redis) -> None:
    cap = Capture(CFG, r)  # maxlen 100, trimmed approximately (whole macro nodes of 100 entries)
    body, resp = request(chat_body()), orjson.dumps(completion("m0", "ok"))
    for _ in range(5):
        for _ in range(200):
            cap.submit(exchange(), body, resp)
        await cap.flush()
    n = await r.xlen(stream_key("developer"))
    assert CFG.maxlen <= n <= CFG.maxlen + 100, n


async def test_a_full_queue_drops_and_counts_instead_of_growing(r: Redis) -> None:
    m = metrics()
    cap = Capture(CFG, r, metrics=m)
    body, resp = request(chat_body()), orjson.dumps(completion("m0", "ok"))
    for _ in range(QUEUE_MAX + 5):
        cap.submit(exchange(), body, resp)
    assert counts(m) == {("T0", "dropped"): 5}
    await cap.flush()
    assert counts(m)[("T0", "captured")] == QUEUE_MAX


async def test_redis_down_drops_the_batch_without_raising_then_recovers(r: Redis, redis_url: str) -> None:
    m = metrics()
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    cap = Capture(CFG, dead, metrics=m)
    body, resp = request(chat_body()), orjson.dumps(completion("m0", "ok"))
    cap.submit(exchange(), body, resp)
    await cap.flush()
    assert counts(m) == {("T0", "failed"): 1}
    cap.redis = r
    cap.submit(exchange(), body, resp)
    await cap.flush()
    assert counts(m)[("T0", "captured")] == 1
    await dead.aclose()


async def test_the_flusher_writes_without_being_asked_and_stop_flushes(r: Redis) -> None:
    cap = Capture(CFG, r)
    await cap.start()
    body, resp = request(chat_body()), orjson.dumps(completion("m0", "ok"))
    cap.submit(exchange(), body, resp)
    for _ in range(200):  # the flusher's interval is 50 ms; poll its effect, up to 10 s
        if await r.xlen(stream_key("developer")):
            break
        await asyncio.sleep(0.05)
    assert await r.xlen(stream_key("developer")) == 1
    cap.submit(exchange(), body, resp)
    await cap.stop()
    assert await r.xlen(stream_key("developer")) == 2


async def test_submit_returns_at_once_for_a_large_exchange() -> None:
    # No Redis needed: submit only queues. The CPU work happens in the flusher's worker thread.
    cap = Capture(CaptureConfig(targets={"T0": ("*",)}, max_bytes=10_000_000), Redis.from_url("redis://127.0.0.1:1"))
    body = request(chat_body(planted() * 2000))
    t = time.perf_counter()
    for _ in range(100):
        cap.submit(exchange(), body, orjson.dumps(completion("m0", "x" * 100_000)))
    assert time.perf_counter() - t < 0.5


def test_wants_only_the_configured_tiers_and_agents() -> None:
    cap = Capture(CFG, Redis.from_url("redis://127.0.0.1:1"))
    assert cap.wants("T0", "developer")
    assert not cap.wants("T0", "architect") and not cap.wants("T1", "developer") and not cap.wants("T0", None)
    assert cap.wants("T3", "anyone") and not cap.wants("T3", None)


def test_usage_in_a_stream_is_read_when_the_exchange_has_none() -> None:
    resp = sse("a").replace(b"data: [DONE]", b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\ndata: [DONE]')
    assert reply_text(resp, True) == ("a", "stop", {"prompt_tokens": 1})
