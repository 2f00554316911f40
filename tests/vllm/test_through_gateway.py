"""The gateway in front of real vLLM (the session's engine, tests/conftest.py), called with the official
`openai` client: what vLLM answers reaches the caller unchanged (greedy text, choices, finish reasons,
streamed chunks, usage) and the ledger books exactly the usage vLLM counted. vLLM's client errors (context
too long, a bad parameter, an adapter it does not serve) arrive in OpenAI's envelope with vLLM's status and
param, and book nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import VLLM_MAX_MODEL_LEN, RunningVllm
from tests.fakes.gateway import RunningGateway, start_gateway
from tests.metered import ADMIN_KEY, create_key, records

BASE = "SmolLM2-135M-Instruct"
UNPUBLISHED = "t0-never-published"  # an adapter the config routes to but vLLM does not serve
ASK = [{"role": "user", "content": "List three colours of the rainbow."}]


@pytest.fixture
def gateway(vllm_server: RunningVllm, redis_url: str, pricing_file: Path, tmp_path: Path) -> Iterator[RunningGateway]:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin_key").write_text(ADMIN_KEY)
    config = {
        "default_tier": "T0",
        "health_interval": 60,
        "tiers": {
            "T0": {
                "model": BASE,
                "aliases": ["qlp-t0"],
                "adapters": [UNPUBLISHED],
                "backends": [{"name": "t0-vllm", "base_url": f"{vllm_server.url}/v1"}],
            }
        },
    }
    gw = start_gateway(config, tmp_path, metering=True, redis_url=redis_url, pricing=pricing_file)
    yield gw
    gw.stop()


@pytest.fixture
def key(redis_url: str) -> str:
    k, _ = create_key(redis_url, "acme")
    return k


def client(gw: RunningGateway, key: str, workflow: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key=key,
        max_retries=0,
        default_headers={"X-QLP-Tier": "T0", "X-QLP-Workflow-Id": workflow},
    )


def direct(vllm: RunningVllm) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm.url + "/v1", api_key="unused", max_retries=0)


def booked(rec: dict[str, Any]) -> tuple[int, int, bool]:
    return rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]


def test_greedy_chat_is_vllms_answer_and_is_booked_at_its_usage(gateway, key, vllm_server) -> None:
    kw: dict[str, Any] = {"messages": ASK, "max_tokens": 24, "temperature": 0}
    ours = client(gateway, key, "plain").chat.completions.create(model="qlp-t0", **kw)
    theirs = direct(vllm_server).chat.completions.create(model=BASE, **kw)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].message.content and ours.choices[0].finish_reason == theirs.choices[0].finish_reason
    assert ours.usage == theirs.usage and ours.usage is not None
    (rec,) = records(gateway, key, "plain", 1)
    assert booked(rec) == (ours.usage.prompt_tokens, ours.usage.completion_tokens, False)
    assert (rec["tier"], rec["backend"], rec["model"], rec["status"]) == ("T0", "t0-vllm", BASE, 200)


def test_stream_relays_vllms_chunks_and_usage_only_when_asked(gateway, key) -> None:
    c = client(gateway, key, "stream")
    kw: dict[str, Any] = {"model": "qlp-t0", "messages": ASK, "max_tokens": 20, "temperature": 0}
    whole = c.chat.completions.create(**kw)
    asked = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    unasked = list(c.chat.completions.create(**kw, stream=True))

    def text(chunks: list[Any]) -> str:
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    assert text(asked) == text(unasked) == whole.choices[0].message.content
    assert asked[-1].choices == [] and asked[-1].usage == whole.usage  # the usage chunk, last
    assert all(ch.usage is None for ch in asked[:-1])
    assert all(ch.usage is None for ch in unasked)  # the gateway asked vLLM for usage; the caller did not
    assert [ch.choices[0].finish_reason for ch in unasked if ch.choices][-1] == whole.choices[0].finish_reason
    assert whole.usage is not None
    recs = records(gateway, key, "stream", 3)
    assert [booked(r) for r in recs] == [(whole.usage.prompt_tokens, whole.usage.completion_tokens, False)] * 3
    assert sorted(r["stream"] for r in recs) == [False, True, True]


def test_n_choices_with_a_seed_are_reproducible_and_booked_in_full(gateway, key) -> None:
    c = client(gateway, key, "n")
    kw: dict[str, Any] = {
        "model": "qlp-t0",
        "messages": ASK,
        "max_tokens": 16,
        "temperature": 1.0,
        "n": 3,
        "seed": 1234,
    }
    first, again = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert [ch.message.content for ch in first.choices] == [ch.message.content for ch in again.choices]
    other = c.chat.completions.create(**{**kw, "seed": 99})
    assert [ch.message.content for ch in other.choices] != [ch.message.content for ch in first.choices]
    streamed = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    by_index: dict[int, str] = {}
    for ch in streamed:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert [by_index[i] for i in range(3)] == [ch.message.content for ch in first.choices]
    assert first.usage is not None and streamed[-1].usage == first.usage
    recs = records(gateway, key, "n", 4)
    assert {booked(r) for r in recs} == {
        (first.usage.prompt_tokens, first.usage.completion_tokens, False),
        (other.usage.prompt_tokens, other.usage.completion_tokens, False),
    }  # type: ignore[union-attr]


def test_stop_ends_the_text_before_the_stop_string(gateway, key) -> None:
    c = client(gateway, key, "stop")
    kw: dict[str, Any] = {"model": "qlp-t0", "messages": ASK, "max_tokens": 32, "temperature": 0}
    full = c.chat.completions.create(**kw).choices[0].message.content or ""
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    cut = c.chat.completions.create(**kw, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(c.chat.completions.create(**kw, stop=[stop], stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full[: full.index(stop)]
    recs = records(gateway, key, "stop", 3)
    assert cut.usage is not None and booked(recs[1]) == (cut.usage.prompt_tokens, cut.usage.completion_tokens, False)


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    assert exc.response.headers.get("x-request-id")
    err: dict[str, Any] = body["error"]
    return err


@pytest.mark.parametrize(
    ("case", "status", "param"),
    [
        ("prompt_too_long", 400, None),
        ("max_tokens_past_context", 400, "max_tokens"),
        ("unpublished_adapter", 404, "model"),
        ("stream_prompt_too_long", 400, None),
        ("auto_tool_choice", 400, "tool_choice"),  # the fleet's vLLM runs without a tool parser
    ],
)
def test_vllms_client_errors_reach_the_caller_in_openais_envelope_and_book_nothing(
    gateway,
    key,
    case: str,
    status: int,
    param: str | None,
) -> None:
    c = client(gateway, key, f"err-{case}")
    long_prompt = [{"role": "user", "content": "word " * (VLLM_MAX_MODEL_LEN + 50)}]
    calls: dict[str, dict[str, Any]] = {
        "prompt_too_long": {"model": "qlp-t0", "messages": long_prompt, "max_tokens": 8},
        "max_tokens_past_context": {"model": "qlp-t0", "messages": ASK, "max_tokens": VLLM_MAX_MODEL_LEN + 1},
        "unpublished_adapter": {"model": UNPUBLISHED, "messages": ASK, "max_tokens": 8},
        "stream_prompt_too_long": {"model": "qlp-t0", "messages": long_prompt, "max_tokens": 8, "stream": True},
        "auto_tool_choice": {
            "model": "qlp-t0",
            "messages": ASK,
            "max_tokens": 8,
            "tool_choice": "auto",
            "tools": [
                {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
            ],
        },
    }
    with pytest.raises(openai.APIStatusError) as info:
        out = c.chat.completions.create(**calls[case])
        if calls[case].get("stream"):
            list(out)  # type: ignore[arg-type]
    assert info.value.status_code == status
    err = _error(info.value)
    assert err["type"] == "invalid_request_error" and (param is None or err["param"] == param)
    if case == "unpublished_adapter":
        assert err["code"] == "model_not_found" and UNPUBLISHED in err["message"]
    elif case == "auto_tool_choice":
        assert "tool" in err["message"]
    else:
        assert str(VLLM_MAX_MODEL_LEN) in err["message"]  # vLLM says what the limit is
    # Nothing was served, so nothing is booked: the next good request is the workflow's only record.
    ok = c.chat.completions.create(model="qlp-t0", messages=ASK, max_tokens=4)
    (rec,) = records(gateway, key, f"err-{case}", 1)
    assert ok.usage is not None and booked(rec) == (ok.usage.prompt_tokens, ok.usage.completion_tokens, False)


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ],
)
def test_bad_sampling_parameters_are_400_naming_the_field(gateway, key, bad: dict[str, Any], param: str) -> None:
    c = client(gateway, key, f"bad-{param}")
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="qlp-t0", messages=ASK, **{"max_tokens": 4, **bad})
    err = _error(info.value)
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    ok = c.chat.completions.create(model="qlp-t0", messages=ASK, max_tokens=4)
    (rec,) = records(gateway, key, f"bad-{param}", 1)
    assert ok.usage is not None and booked(rec)[:2] == (ok.usage.prompt_tokens, ok.usage.completion_tokens)


def test_completions_endpoint_streams_and_meters_too(gateway, key) -> None:
    c = client(gateway, key, "completions")
    whole = c.completions.create(model="qlp-t0", prompt="The capital of France is", max_tokens=8, temperature=0)
    streamed = list(
        c.completions.create(
            model="qlp-t0",
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == whole.choices[0].text
    assert streamed[-1].usage == whole.usage and whole.usage is not None
    recs = records(gateway, key, "completions", 2)
    assert [booked(r) for r in recs] == [(whole.usage.prompt_tokens, whole.usage.completion_tokens, False)] * 2


def test_models_and_health_of_the_tier_come_from_vllm(gateway, key, vllm_server) -> None:
    served = {m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models", timeout=10).json()["data"]}
    assert BASE in served
    r = httpx.get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200 and "qlp-t0" in {m["id"] for m in r.json()["data"]}
