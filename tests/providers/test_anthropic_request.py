"""OpenAI chat requests translated to Anthropic Messages requests."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.providers import provider_for
from gateway.providers.anthropic import to_messages_request


def tr(body: dict[str, Any], stream: bool = False, default: int = 4096) -> dict[str, Any]:
    return to_messages_request(body, "claude-x", stream, default)


def test_system_and_developer_messages_become_the_top_level_system_in_order() -> None:
    out = tr(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "hi"},
                {"role": "developer", "content": [{"type": "text", "text": "Use Python."}]},
            ]
        }
    )
    assert out["system"] == "Be terse.\n\nUse Python."
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert all(m["role"] in ("user", "assistant") for m in out["messages"])


def test_consecutive_same_role_messages_are_merged_so_roles_alternate() -> None:
    out = tr(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "assistant", "content": "d"},
                {"role": "user", "content": "e"},
            ]
        }
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert [b["text"] for b in out["messages"][0]["content"]] == ["a", "b"]
    assert [b["text"] for b in out["messages"][1]["content"]] == ["c", "d"]


def test_empty_turns_are_dropped_and_a_request_with_nothing_left_is_refused() -> None:
    out = tr(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"},
            ]
        }
    )
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    with pytest.raises(InvalidRequest):
        tr({"messages": [{"role": "system", "content": "only a system prompt"}]})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, 4096),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
    ],
)
def test_max_tokens_is_always_set_from_the_request_or_the_configured_default(body, expected) -> None:
    assert tr({"messages": [{"role": "user", "content": "x"}], **body})["max_tokens"] == expected


def test_configured_default_max_tokens_is_used() -> None:
    p = provider_for("anthropic", {"max_tokens_default": 333})
    out = orjson.loads(p.request_body({"messages": [{"role": "user", "content": "x"}]}, "m", False))
    assert out["max_tokens"] == 333


@pytest.mark.parametrize(("stop", "expected"), [("END", ["END"]), (["a", "b"], ["a", "b"])])
def test_stop_becomes_stop_sequences(stop, expected) -> None:
    out = tr({"messages": [{"role": "user", "content": "x"}], "stop": stop})
    assert out["stop_sequences"] == expected and "stop" not in out


@pytest.mark.parametrize(("t", "expected"), [(0, 0.0), (0.7, 0.7), (1.0, 1.0), (1.5, 1.0), (2, 1.0)])
def test_temperature_is_clamped_into_anthropics_range_not_scaled(t, expected) -> None:
    assert tr({"messages": [{"role": "user", "content": "x"}], "temperature": t})["temperature"] == expected


def test_top_p_and_top_k_pass_and_user_becomes_metadata() -> None:
    out = tr({"messages": [{"role": "user", "content": "x"}], "top_p": 0.9, "top_k": 5, "user": "u-1"})
    assert out["top_p"] == 0.9 and out["top_k"] == 5 and out["metadata"] == {"user_id": "u-1"}


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_function_tools_become_anthropic_tools() -> None:
    out = tr({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": TOOLS[0]["function"]["parameters"],
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "now"}}, None, {"type": "tool", "name": "now"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, None, None),
    ],
)
def test_tool_choice_mapping(choice, parallel, expected) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert tr(body).get("tool_choice") == expected


def test_assistant_tool_calls_and_tool_results_round_trip_into_blocks() -> None:
    out = tr(
        {
            "messages": [
                {"role": "user", "content": "weather in Oslo and Rome?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "5C"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "20C"}]},
                {"role": "user", "content": "thanks"},
            ],
            "tools": TOOLS,
        }
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "5C"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "20C"},
        {"type": "text", "text": "thanks"},
    ]


def test_image_parts_become_image_blocks() -> None:
    out = tr(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ]
        }
    )
    assert out["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}], "n": 2},
        {"messages": [{"role": "function", "name": "f", "content": "x"}]},
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{no"}}]}
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
            ]
        },
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "code_interpreter"}]},
        {"messages": [{"role": "tool", "content": "orphan"}]},
    ],
)
def test_requests_anthropic_cannot_express_are_refused_with_400(body) -> None:
    with pytest.raises(InvalidRequest) as e:
        tr(body)
    assert e.value.status == 400


def test_fields_without_an_equivalent_are_dropped_and_logged(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="qlp.gateway"):
        out = tr(
            {
                "messages": [{"role": "user", "content": "x"}],
                "seed": 1,
                "logit_bias": {},
                "presence_penalty": 1,
                "stream_options": {"include_usage": True},
            }
        )
    assert set(out) == {"model", "max_tokens", "messages"}
    assert "logit_bias,presence_penalty,seed" in caplog.text


def test_stream_flag_and_model_come_from_the_arguments() -> None:
    out = tr({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}], "stream": True}, stream=True)
    assert out["model"] == "claude-x" and out["stream"] is True
    assert "stream" not in tr({"messages": [{"role": "user", "content": "x"}], "stream": True}, stream=False)
