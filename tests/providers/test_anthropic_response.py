"""Anthropic responses and streams translated to OpenAI's, checked against the openai package's own types."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.providers import ProviderError, provider_for
from gateway.providers.anthropic_stream import AnthropicStream
from tests.fakes.anthropic import AnthropicScript, anthropic_events, anthropic_message

P = provider_for("anthropic", {})
WEATHER = ("get_weather", {"city": "Oslo", "unit": "celsius"})


def events_of(out: bytes) -> list[Any]:
    """OpenAI SSE bytes -> parsed events ([DONE] as the string)."""
    assert out.endswith(b"\n\n")
    parsed: list[Any] = []
    for e in out.split(b"\n\n")[:-1]:
        assert e.startswith(b"data: ")
        parsed.append("[DONE]" if e == b"data: [DONE]" else json.loads(e[6:]))
    return parsed


def run(stream: list[bytes], split: int | None = None) -> list[Any]:
    t = AnthropicStream()
    raw = b"".join(stream)
    pieces = [raw[i : i + split] for i in range(0, len(raw), split)] if split else stream
    return events_of(b"".join(t.feed(p) for p in pieces))


def sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


# -- non-streamed ----------------------------------------------------------------------------------------


def test_text_response_becomes_a_chat_completion() -> None:
    raw, usage = P.response_body(orjson.dumps(anthropic_message(AnthropicScript(text="Hi there"), "claude-x")))
    c = ChatCompletion.model_validate_json(raw)
    assert c.id == "msg_fake01" and c.model == "claude-x" and c.object == "chat.completion"
    assert c.choices[0].message.content == "Hi there" and c.choices[0].finish_reason == "stop"
    assert c.choices[0].message.tool_calls is None
    assert usage == json.loads(raw)["usage"]


def test_tool_use_response_becomes_tool_calls_with_json_arguments() -> None:
    s = AnthropicScript(text="", tool=WEATHER)
    c = ChatCompletion.model_validate_json(P.response_body(orjson.dumps(anthropic_message(s, "m")))[0])
    call = c.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert c.choices[0].finish_reason == "tool_calls" and c.choices[0].message.content is None
    assert call.id == "toolu_01" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER[1]


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("something_new", "stop"),
    ],
)
def test_stop_reason_maps_to_finish_reason_streamed_and_not(stop, finish) -> None:
    s = AnthropicScript(stop_reason=stop)
    c = ChatCompletion.model_validate_json(P.response_body(orjson.dumps(anthropic_message(s, "m")))[0])
    assert c.choices[0].finish_reason == finish
    finishes = [e["choices"][0]["finish_reason"] for e in run(anthropic_events(s, "m"))[:-1] if e["choices"]]
    assert [f for f in finishes if f] == [finish]


def test_cache_reads_and_writes_are_part_of_prompt_tokens_and_itemised() -> None:
    s = AnthropicScript(input_tokens=10, output_tokens=4, cache_read=1000, cache_write=200)
    _, usage = P.response_body(orjson.dumps(anthropic_message(s, "m")))
    assert usage == {
        "prompt_tokens": 1210,
        "completion_tokens": 4,
        "total_tokens": 1214,
        "prompt_tokens_details": {"cached_tokens": 1000, "cache_creation_tokens": 200},
    }


@pytest.mark.parametrize("raw", [b"not json", b'{"type": "error"}', b"[]"])
def test_an_unreadable_response_is_a_protocol_error(raw) -> None:
    with pytest.raises(ProviderError) as e:
        P.response_body(raw)
    assert e.value.error.kind == "protocol" and e.value.error.status == 502


# -- streamed --------------------------------------------------------------------------------------------


def test_stream_translates_every_event_and_ends_with_usage_then_done() -> None:
    out = run(anthropic_events(AnthropicScript(text="Hello there, friend."), "claude-x"))
    assert out[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in out[:-1]]
    assert all(c.id == "msg_fake01" and c.model == "claude-x" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there, friend."
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


@pytest.mark.parametrize("split", [1, 2, 7, 64])
def test_events_split_anywhere_translate_the_same(split) -> None:
    stream = anthropic_events(AnthropicScript(tool=WEATHER, cache_read=3), "m")
    assert run(stream, split) == run(stream)


def test_crlf_line_endings_split_between_chunks_are_understood() -> None:
    stream = [e.replace(b"\n", b"\r\n") for e in anthropic_events(AnthropicScript(), "m")]
    assert run(stream, 1) == run(anthropic_events(AnthropicScript(), "m"))


def test_streamed_tool_use_becomes_tool_call_deltas() -> None:
    out = run(anthropic_events(AnthropicScript(text="Let me check.", tool=WEATHER), "m"))
    chunks = [ChatCompletionChunk.model_validate(e) for e in out[:-1]]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id == "toolu_01" and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == WEATHER[1]  # type: ignore[union-attr]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_two_tool_blocks_get_consecutive_tool_call_indexes() -> None:
    stream = [
        sse({"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 3}}}),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
        sse({"type": "content_block_stop", "index": 0}),
        sse(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
            }
        ),
        sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
        sse({"type": "content_block_stop", "index": 1}),
        sse(
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "t2", "name": "b", "input": {}},
            }
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 2,
                "delta": {"type": "input_json_delta", "partial_json": '{"x":1}'},
            }
        ),
        sse({"type": "content_block_stop", "index": 2}),
        sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        sse({"type": "message_stop"}),
    ]
    calls = [tc for e in run(stream)[:-1] if e["choices"] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c.get("id")) for c in calls] == [(0, "t1"), (0, None), (1, "t2"), (1, None)]


def test_ping_thinking_and_unknown_events_produce_nothing() -> None:
    t = AnthropicStream()
    t.feed(sse({"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 3}}}))
    assert t.feed(sse({"type": "ping"})) == b""
    assert (
        t.feed(sse({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}))
        == b""
    )
    assert (
        t.feed(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}}))
        == b""
    )
    assert t.feed(sse({"type": "some_future_event", "x": 1})) == b""
    assert t.feed(b": a comment line\n\n") == b""


def test_the_role_chunk_waits_for_content_so_early_errors_can_fall_back() -> None:
    t = AnthropicStream()
    start = anthropic_events(AnthropicScript(), "m")[:2]  # message_start, ping
    assert t.feed(b"".join(start)) == b""
    with pytest.raises(ProviderError) as e:
        t.feed(sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    assert e.value.pending == b"" and e.value.error.kind == "overloaded" and e.value.error.retryable


def test_an_error_event_mid_stream_raises_after_the_output_before_it() -> None:
    events = anthropic_events(AnthropicScript(text="one two three"), "m")
    err = sse({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
    t = AnthropicStream()
    with pytest.raises(ProviderError) as e:
        t.feed(b"".join(events[:5]) + err)
    pending = events_of(e.value.pending)
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pending) == "one two "
    assert e.value.error.kind == "status_5xx" and e.value.error.status == 502
    assert b"[DONE]" not in e.value.pending


def test_a_truncated_stream_never_says_done() -> None:
    events = anthropic_events(AnthropicScript(), "m")
    t = AnthropicStream()
    out = b"".join(t.feed(e) for e in events[:-1])  # everything but message_stop
    assert b"[DONE]" not in out and not t.done
    assert b'"usage"' not in out  # no usage chunk either: metering sees the stream as incomplete


def test_a_malformed_event_is_a_protocol_error() -> None:
    with pytest.raises(ProviderError) as e:
        AnthropicStream().feed(b"event: message_start\ndata: {not json\n\n")
    assert e.value.error.kind == "protocol"


def test_message_delta_usage_is_cumulative_and_may_restate_input() -> None:
    stream = [
        sse(
            {
                "type": "message_start",
                "message": {
                    "id": "m1",
                    "model": "m",
                    "usage": {
                        "input_tokens": 5,
                        "output_tokens": 1,
                        "cache_read_input_tokens": 2,
                        "cache_creation_input_tokens": 0,
                    },
                },
            }
        ),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {
                    "output_tokens": 12,
                    "input_tokens": 5,
                    "cache_read_input_tokens": 2,
                    "cache_creation_input_tokens": 0,
                },
            }
        ),
        sse({"type": "message_stop"}),
    ]
    assert run(stream)[-2]["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 12,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 2, "cache_creation_tokens": 0},
    }


# -- cost parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s",
    [
        AnthropicScript(),
        AnthropicScript(input_tokens=900, output_tokens=321, cache_read=4096, cache_write=1024),
        AnthropicScript(text="", tool=WEATHER, input_tokens=40, output_tokens=55, cache_write=7),
    ],
)
def test_the_same_exchange_has_the_same_usage_streamed_and_not(s) -> None:
    _, plain = P.response_body(orjson.dumps(anthropic_message(s, "m")))
    streamed = run(anthropic_events(s, "m"))[-2]["usage"]
    assert streamed == plain


def test_the_same_exchange_costs_the_same_streamed_and_not() -> None:
    pricing = pytest.importorskip("gateway.metering.pricing")
    s = AnthropicScript(input_tokens=900, output_tokens=321, cache_read=4096, cache_write=1024)
    _, plain = P.response_body(orjson.dumps(anthropic_message(s, "m")))
    streamed = run(anthropic_events(s, "m"))[-2]["usage"]
    price = pricing.ModelPrice(input=3_000_000, output=15_000_000, cached_input=300_000, cache_write=3_750_000)
    t = pricing.tokens_from_usage(plain)
    assert t == pricing.tokens_from_usage(streamed)
    assert (t.prompt, t.cached, t.cache_write) == (900 + 4096 + 1024, 4096, 1024)
    assert price.cost(t) == price.cost(pricing.tokens_from_usage(streamed))
