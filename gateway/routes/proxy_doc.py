"""OpenAPI description of the proxy routes.

The proxy routes are served by `gateway.serving.handle`, dispatched in `gateway.app.Gateway` before
FastAPI sees the request. These declarations only put them in the OpenAPI document (and make FastAPI answer
405 for a wrong method); their bodies never run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Security
from pydantic import BaseModel, ConfigDict, Field

from gateway.config import FleetConfig
from gateway.protocol import COMPLETION_LOGPROBS, INT64, MAX_TOKEN_ID, NUMBER_RANGES, TOP_LOGPROBS
from gateway.routes.responses import bearer, errors

__all__ = ["router"]

router = APIRouter(tags=["proxy"], dependencies=[Security(bearer)])

# The models below say exactly what gateway/protocol.py accepts, so that a request valid by this
# description is served and an invalid one is refused (tests/reliability/test_fuzz_openapi.py checks both).
# Limits are the fleet defaults; a fleet config may set others (`max_n`, `max_tokens_limit`).
MAX_N: int = FleetConfig.model_fields["max_n"].default
MAX_TOKENS: int = FleetConfig.model_fields["max_tokens_limit"].default
NOptional = Annotated[int, Field(ge=1, le=MAX_N)] | None
TokensOptional = Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


def _within(bounds: tuple[float, float]) -> Any:
    """A Field constrained to one of gateway/protocol.py's (lowest, highest) pairs."""
    lo, hi = bounds
    return Field(ge=lo, le=hi)


Temperature = Annotated[float, _within(NUMBER_RANGES["temperature"])] | None
TopP = Annotated[float, _within(NUMBER_RANGES["top_p"])] | None
Presence = Annotated[float, _within(NUMBER_RANGES["presence_penalty"])] | None
Frequency = Annotated[float, _within(NUMBER_RANGES["frequency_penalty"])] | None


class Sampling(BaseModel):
    """The sampling fields gateway/protocol.py checks (OpenAI's documented types and ranges)."""

    model_config = ConfigDict(extra="allow")
    temperature: Temperature = None
    top_p: TopP = None
    presence_penalty: Presence = None
    frequency_penalty: Frequency = None
    # lt 2**63, not le 2**63 - 1: FastAPI passes bounds through floats; 2.0**63 is exact, 2**63 - 1 is not.
    seed: Annotated[int, Field(ge=INT64[0], lt=INT64[1] + 1)] | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "tool"]
    content: str | list[Any]


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant", "function"]
    content: str | list[Any] | None = None


class ChatCompletionRequest(Sampling):
    model: str | None = None
    messages: Annotated[list[ChatMessage | AssistantMessage], Field(min_length=1)]
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: NOptional = None
    max_tokens: TokensOptional = None
    max_completion_tokens: TokensOptional = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, _within(TOP_LOGPROBS)] | None = None


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str | TokenId], Field(min_length=1)]
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: NOptional = None
    max_tokens: TokensOptional = None
    max_completion_tokens: TokensOptional = None
    logprobs: Annotated[int, _within(COMPLETION_LOGPROBS)] | None = None


# Optional headers: an empty one is the same as none (hence the "" defaults). The fleet's tiers are T0..T3;
# case and surrounding blanks do not matter.
TierH = Annotated[
    str, Header(description="T0..T3; else `model` decides; else the default tier", pattern=r"^\s*([Tt][0-3])?\s*$")
]
AgentH = Annotated[str, Header(description="agent role; picks its adapter within the tier")]
WorkflowH = Annotated[str, Header(description="groups requests for cost per workflow")]
RequestIdH = Annotated[str, Header(description="idempotency and correlation key; echoed")]
# 200: JSON, or server-sent events when `stream` is true (the schema describes each event, as before OpenAPI
# 3.2: its data is a chunk object as JSON, or [DONE]; a failure after the stream started is an error envelope).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
PROXY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
    **errors(400, 401, 404, 413, 429, 502, 503, 504),
}


def _unreachable() -> dict[str, Any]:
    raise RuntimeError("proxy routes are dispatched by gateway.app.Gateway")


@router.post("/v1/chat/completions", summary="OpenAI chat completions, routed by tier", responses=PROXY_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest,
    x_qlp_tier: TierH = "",
    x_qlp_agent: AgentH = "",
    x_qlp_workflow_id: WorkflowH = "",
    x_request_id: RequestIdH = "",
) -> dict[str, Any]:
    return _unreachable()


@router.post("/v1/completions", summary="OpenAI completions, routed by tier", responses=PROXY_RESPONSES)
async def completions(
    body: CompletionRequest,
    x_qlp_tier: TierH = "",
    x_qlp_agent: AgentH = "",
    x_qlp_workflow_id: WorkflowH = "",
    x_request_id: RequestIdH = "",
) -> dict[str, Any]:
    return _unreachable()
