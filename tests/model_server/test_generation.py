"""Generation through the OpenAI client: determinism, streaming, usage, stops, lengths, choices, seeds."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from .conftest import BASE

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_stream(client: openai.OpenAI, **kw: Any) -> tuple[str, str | None, Any, list[Any]]:
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, (reasons[-1] if reasons else None), chunks[-1].usage, chunks


def test_greedy_chat_is_deterministic_and_stream_equals_non_stream(
    client: openai.OpenAI, tokenizer: Any
) -> None:
    kw: dict[str, Any] = {"model": BASE, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    first = client.chat.completions.create(**kw)
    second = client.chat.completions.create(**kw)
    text, reason, usage, chunks = _chat_stream(client, **kw)

    assert first.choices[0].message.content == second.choices[0].message.content
    assert "Paris" in (first.choices[0].message.content or "")
    assert text == first.choices[0].message.content
    assert reason == first.choices[0].finish_reason == "stop"
    # The opening chunk carries the role; the last one is the usage chunk with no choices.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    # Usage is exact: the chat template's tokens, and the generated tokens including the end token.
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n_completion = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (n_prompt, n_completion)
    assert usage.model_dump() == first.usage.model_dump()


def test_greedy_completion_stream_equals_non_stream(client: openai.OpenAI, tokenizer: Any) -> None:
    kw: dict[str, Any] = {"model": BASE, "prompt": "def fibonacci(n):", "temperature": 0, "max_tokens": 12}
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and chunks[-1].usage is not None
    assert full.usage.prompt_tokens == len(tokenizer("def fibonacci(n):")["input_ids"])
    assert full.usage.completion_tokens == 12
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=3)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_stop_string_cuts_text_in_both_modes(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": BASE,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 16,
        "stop": [" Paris"],
    }
    out = client.chat.completions.create(**kw)
    text, reason, _, _ = _chat_stream(client, **kw)
    assert out.choices[0].message.content == "The capital of France is"
    assert out.choices[0].finish_reason == "stop"
    assert (text, reason) == ("The capital of France is", "stop")


def test_n_choices_each_get_the_greedy_text(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=4, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content
    assert [c.finish_reason for c in out.choices] == ["length", "length"]
    assert out.usage is not None and out.usage.completion_tokens == 8  # both choices count


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "temperature": 1.0,
        "top_p": 0.9,
        "max_tokens": 12,
        "seed": 1234,
    }
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
