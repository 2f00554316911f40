"""GET /v1/models: the tiers, their aliases, adapters and served models, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.runtime import Runtime

__all__ = ["router"]

router = APIRouter()


def _model(id_: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "object": "model", "created": created, "owned_by": "qlp", **extra}


@router.get("/v1/models", summary="List tiers, aliases and adapters")
async def list_models(request: Request) -> dict[str, Any]:
    rt: Runtime = request.app.state.runtime
    created = rt.started_at
    data: list[dict[str, Any]] = []
    listed = {key for name, t in rt.config.tiers.items() for key in (name, *t.aliases, *t.adapters)}
    for name, tier in rt.config.tiers.items():
        data.append(
            _model(
                name,
                created,
                tier=name,
                kind=tier.kind.value,
                upstream_model=tier.model,
                description=tier.description,
                fallback=list(tier.fallback),
            )
        )
        data.extend(_model(alias, created, tier=name, parent=name) for alias in tier.aliases)
        for adapter in tier.adapters:
            agents = sorted(a for a, ad in tier.agents.items() if ad == adapter)
            data.append(_model(adapter, created, tier=name, parent=tier.model, agents=agents))
        if tier.model not in listed:  # the served model's own name routes to the first tier serving it
            listed.add(tier.model)
            data.append(_model(tier.model, created, tier=name, parent=name))
    return {"object": "list", "data": data}
