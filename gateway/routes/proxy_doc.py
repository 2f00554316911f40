"""OpenAPI description of the proxy routes.

The proxy routes are served by `gateway.serving.handle`, dispatched in `gateway.app.Gateway` before
FastAPI sees the request. These declarations only put them in the OpenAPI document (and make FastAPI answer
405 for a wrong method); their bodies never run.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict

__all__ = ["router"]

router = APIRouter(tags=["proxy"])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    n: int | None = None
    max_tokens: int | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str] | list[int]
    stream: bool = False
    max_tokens: int | None = None


TierH = Annotated[str | None, Header(description="T0..T3; else `model` decides; else the default tier")]
AgentH = Annotated[str | None, Header(description="agent role; picks its adapter within the tier")]
WorkflowH = Annotated[str | None, Header(description="groups requests for cost per workflow")]
RequestIdH = Annotated[str | None, Header(description="idempotency and correlation key; echoed")]


def _unreachable() -> dict[str, Any]:
    raise RuntimeError("proxy routes are dispatched by gateway.app.Gateway")


@router.post("/v1/chat/completions", summary="OpenAI chat completions, routed by tier")
async def chat_completions(
    body: ChatCompletionRequest,
    x_qlp_tier: TierH = None,
    x_qlp_agent: AgentH = None,
    x_qlp_workflow_id: WorkflowH = None,
    x_request_id: RequestIdH = None,
) -> dict[str, Any]:
    return _unreachable()


@router.post("/v1/completions", summary="OpenAI completions, routed by tier")
async def completions(
    body: CompletionRequest,
    x_qlp_tier: TierH = None,
    x_qlp_agent: AgentH = None,
    x_qlp_workflow_id: WorkflowH = None,
    x_request_id: RequestIdH = None,
) -> dict[str, Any]:
    return _unreachable()
