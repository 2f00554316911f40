"""Rollout admin routes (admin key only; docs/rollout.md):

GET    /v1/admin/rollouts                    every rollout in force, and whether config or runtime set it
PUT    /v1/admin/rollouts/{tier}/{agent}     replace a rollout's arms and shadow (at run time, all processes)
DELETE /v1/admin/rollouts/{tier}/{agent}     drop the runtime rollout: the config's applies again
POST   /v1/admin/routes                      {tier, agent, adapter, weight}: route an agent to an adapter,
                                             all of it (weight 100) or as a canary (`qlp train publish`)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Security
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from gateway.metering.meter import UNAVAILABLE
from gateway.metering.routes import AdminDep
from gateway.rollout.model import ADAPTER, AGENT, NAME, Arm, Rollout, RolloutError
from gateway.rollout.registry import Rollouts
from gateway.routes.responses import bearer, errors

__all__ = ["BASELINE", "router", "with_canary"]

BASELINE = "baseline"  # the arm that keeps the tier's usual routing when a canary is added to no rollout

router = APIRouter(tags=["rollouts"], dependencies=[Security(bearer)])


def _rollouts(request: Request) -> Rollouts:
    rollouts: Rollouts = request.app.state.runtime.rollouts
    return rollouts


RolloutsDep = Annotated[Rollouts, Depends(_rollouts)]
TierPath = Annotated[str, Path(pattern=r"^T[0-9]$", description="tier name, T0..T9")]
AgentPath = Annotated[str, Path(pattern=AGENT.pattern, description="agent role; '*' for any agent")]


@contextlib.contextmanager
def _applying() -> Iterator[None]:
    try:
        yield
    except RolloutError as exc:
        raise InvalidRequest(str(exc), code="invalid_rollout") from exc
    except UNAVAILABLE as exc:
        raise ServiceUnavailable("the rollout store is unreachable", code="ledger_unavailable") from exc


def _view(rollouts: Rollouts, tier: str, agent: str) -> dict[str, Any]:
    return next(
        (r for r in rollouts.effective() if r["tier"] == tier and r["agent"] == agent),
        {"tier": tier, "agent": agent, "arms": [], "shadow": None, "source": "none"},
    )


@router.get("/v1/admin/rollouts", summary="Rollouts in force (arms, weights, shadow)", responses=errors(401, 403, 404))
async def list_rollouts(_: AdminDep, rollouts: RolloutsDep) -> dict[str, Any]:
    return {"object": "list", "data": rollouts.effective()}


@router.put(
    "/v1/admin/rollouts/{tier}/{agent}",
    summary="Set a rollout's arms and shadow at run time",
    responses=errors(400, 401, 403, 404, 503),
)
async def put_rollout(
    _: AdminDep, rollouts: RolloutsDep, tier: TierPath, agent: AgentPath, body: Rollout
) -> dict[str, Any]:
    with _applying():
        await rollouts.put(tier, agent, body)
    return _view(rollouts, tier, agent)


@router.delete(
    "/v1/admin/rollouts/{tier}/{agent}",
    summary="Drop a runtime rollout (the config's applies again)",
    responses=errors(400, 401, 403, 404, 503),
)
async def delete_rollout(_: AdminDep, rollouts: RolloutsDep, tier: TierPath, agent: AgentPath) -> dict[str, Any]:
    with _applying():
        removed = await rollouts.delete(tier, agent)
    if not removed:
        raise NotFound(f"no runtime rollout for {tier}/{agent[:64]}", code="rollout_not_found")
    return _view(rollouts, tier, agent)


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: str = Field(pattern=r"^T[0-9]$")
    agent: str = Field(pattern=AGENT.pattern)
    adapter: str = Field(pattern=ADAPTER, description="the adapter name the model servers serve")
    weight: float = Field(100.0, gt=0, le=100, description="percent of the agent's workflows; 100: all of them")
    arm: str | None = Field(None, pattern=NAME, description="the arm's name (default: from the adapter)")


def with_canary(current: Rollout | None, arm: Arm) -> Rollout:
    """`current` with `arm` at `arm.weight` percent; the other arms keep their proportions in the rest.
    The new arm goes last: as its weight grows, workflows move to it and never between the others."""
    shadow = current.shadow if current is not None else None
    if arm.weight >= 100:
        return Rollout(arms=(arm.model_copy(update={"weight": 100.0}),), shadow=shadow)
    others = [a for a in (current.arms if current is not None else ()) if a.name != arm.name]
    total = sum(a.weight for a in others)
    if total <= 0:
        others, total = [Arm(name=BASELINE, weight=100.0)], 100.0
    rest = 100.0 - arm.weight
    scaled = tuple(a.model_copy(update={"weight": a.weight * rest / total}) for a in others)
    return Rollout(arms=(*scaled, arm), shadow=shadow)


@router.post(
    "/v1/admin/routes",
    summary="Route an agent's workflows to an adapter (all, or as a canary)",
    responses=errors(400, 401, 403, 404, 503),
)
async def route_adapter(_: AdminDep, rollouts: RolloutsDep, body: RouteRequest) -> dict[str, Any]:
    name = body.arm or re.sub(r"[^A-Za-z0-9._-]", "-", body.adapter)[:64]
    arm = Arm(name=name, weight=body.weight, adapter=body.adapter)
    with _applying():
        await rollouts.put(body.tier, body.agent, with_canary(rollouts.get(body.tier, body.agent), arm))
    return _view(rollouts, body.tier, body.agent)
