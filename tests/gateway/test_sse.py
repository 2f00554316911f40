"""The one SSE parser (gateway/sse.py) and the relay's filter on it: the spec's line ends and field forms,
bytes split anywhere, and the usage read from every valid form of a data line."""

from __future__ import annotations

import random

import orjson
import pytest

from gateway.capture.record import reply_text
from gateway.sse import EventBuffer, data_of, events_of
from gateway.upstream.sse import SSEFilter

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def chunk(content: str) -> bytes:
    return orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        }
    )


def stream(sep: bytes = b"\n", space: bytes = b" ") -> bytes:
    usage = orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    events = [
        b"data:" + space + chunk("he"),
        b": a comment",
        b"data:" + space + chunk("llo"),
        b"data:" + space + usage,
        b"data:" + space + b"[DONE]",
    ]
    return b"".join(e + sep + sep for e in events)


def feed_split(f: SSEFilter, raw: bytes, rnd: random.Random) -> bytes:
    out, i = [], 0
    while i < len(raw):
        j = min(len(raw), i + rnd.randint(1, 7))
        out.append(f.feed(raw[i:j]))
        i = j
    return b"".join(out) + f.tail()


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("space", [b" ", b""])
def test_every_line_end_and_data_form_split_anywhere_reads_the_usage_and_done(sep: bytes, space: bytes) -> None:
    raw = stream(sep, space)
    for seed in range(30):  # CRLF split between two reads among them
        f = SSEFilter(strip_usage=True)
        out = feed_split(f, raw, random.Random(seed))
        assert f.usage == USAGE and f.done and f.events == 3  # the JSON events, usage chunk included
        assert b'"usage"' not in out and out.endswith(b"[DONE]\n\n")
        assert reply_text(out, stream=True)[0] == "hello"


def test_a_crlf_split_between_reads_completes_the_event_at_once() -> None:
    f = SSEFilter(strip_usage=False)
    assert f.feed(b"data: " + chunk("a") + b"\r\n\r") == b"data: " + chunk("a") + b"\n\n"
    assert f.feed(b"\n") == b""  # the LF that finished the CRLF, not a new blank line
    assert f.feed(b"data: [DONE]\r\n\r\n") == b"data: [DONE]\n\n" and f.done


def test_a_usage_chunk_with_choices_loses_the_usage_field_not_the_choice() -> None:
    obj = {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": USAGE}
    f = SSEFilter(strip_usage=True)
    out = f.feed(b"data:" + orjson.dumps(obj) + b"\n\n")
    assert orjson.loads(out[6:]) == {"id": "c", "choices": obj["choices"]} and f.usage == USAGE


def test_data_lines_join_comments_and_other_fields_are_ignored() -> None:
    assert data_of(b'event: x\nid: 3\ndata: {"a":\ndata:1}') == b'{"a":\n1}'
    assert data_of(b": keep-alive") is None and data_of(b"data") is None
    assert data_of(b"event: x\ndata") == b""
    assert data_of(b"data:  two spaces") == b" two spaces"  # only one leading space is dropped


def test_event_buffer_keeps_an_unfinished_event_for_rest() -> None:
    b = EventBuffer()
    assert b.feed(b"data: 1\n\ndata: 2") == b"data: 1\n\n"
    assert b.rest() == b"data: 2" and list(events_of(b"data: 1\n\n\n\ndata: 2\n\n")) == [b"data: 1", b"data: 2"]
