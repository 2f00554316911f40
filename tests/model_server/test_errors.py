"""Bad input gets OpenAI's error envelope with the right status: never {"detail": ...}, never a traceback."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from .conftest import BASE, MAX_MODEL_LEN, RunningServer

pytestmark = pytest.mark.model

HI = [{"role": "user", "content": "hi"}]
ENVELOPE_KEYS = {"message", "type", "param", "code"}


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=HI, max_tokens=2)
    assert exc.value.code == "model_not_found" and exc.value.param == "model"


def test_prompt_longer_than_context_is_400_with_openai_message(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 50)}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=BASE, messages=long, max_tokens=2)
    assert exc.value.code == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in exc.value.message


def test_max_tokens_beyond_context_is_400_not_clamped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=BASE, messages=HI, max_tokens=MAX_MODEL_LEN)
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "max_tokens"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 1000}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"stop": ["x"] * 40}, "stop"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    client: openai.OpenAI, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=BASE, messages=HI, **params)
    assert exc.value.param == param
    assert exc.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b'{"model": "x"}', 400),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b'{"model": "' + BASE.encode() + b'", "prompt": [99999999]}', 400),
        ("GET", "/v1/nowhere", b"", 404),
        ("GET", "/v1/chat/completions", b"", 405),
        ("POST", "/v1/load_lora_adapter", b'{"lora_name": "z"}', 400),
    ],
)
def test_every_error_is_an_openai_envelope(
    server: RunningServer, method: str, path: str, body: bytes, status: int
) -> None:
    r = httpx.request(
        method, f"{server.url}{path}", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status
    payload = r.json()
    assert set(payload) == {"error"} and set(payload["error"]) == ENVELOPE_KEYS
    assert "Traceback" not in r.text and "detail" not in payload
