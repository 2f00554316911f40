"""Rollouts: per tier and agent, arms with weights (adapter versions, or another tier such as T3) and an
optional shadow. The config's `rollouts:` section holds the defaults; the admin API replaces them at run
time (gateway/rollout/registry.py). Validated here, for both.

    rollouts:
      T0/developer:                       # <tier>/<agent>; agent "*" covers requests of any other agent
        arms:
          - {name: v1, adapter: developer-v1, weight: 90}
          - {name: v2, adapter: developer-v2, weight: 10}   # the canary
          - {name: gpt4, tier: T3, weight: 0}               # weight 0: kept, receives nothing
      T3/developer:
        shadow: {tier: T0, adapter: developer-v2, share: 0.2}  # mirror 20% of T3 traffic, answer discarded
"""

from __future__ import annotations

import re
from collections.abc import Collection

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Arm", "Rollout", "RolloutError", "Shadow", "check_rollout", "rollout_key"]

TIER = r"^T[0-9]$"
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ADAPTER = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
AGENT = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


class RolloutError(ValueError):
    """A rollout that does not fit the fleet config (unknown tier, duplicate arm, ...)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arm(_Model):
    name: str = Field(pattern=NAME, description="the arm's name, as reported (ledger `arm`, /v1/report)")
    weight: float = Field(ge=0, le=1_000_000, description="relative share of workflows; 0: none")
    adapter: str | None = Field(
        None, pattern=ADAPTER, description="model/adapter sent upstream; none: the tier's usual choice"
    )
    tier: str | None = Field(
        None, pattern=TIER, description="serve this arm from another tier (e.g. T3); none: this tier"
    )


class Shadow(_Model):
    tier: str = Field(pattern=TIER, description="the tier that receives the mirrored requests")
    adapter: str | None = Field(None, pattern=ADAPTER, description="model/adapter there; none: the tier's usual")
    share: float = Field(ge=0, le=1, description="share of the requests mirrored, 0..1")


class Rollout(_Model):
    arms: tuple[Arm, ...] = ()
    shadow: Shadow | None = None


def rollout_key(tier: str, agent: str) -> str:
    return f"{tier}/{agent}"


def check_rollout(tiers: Collection[str], tier: str, agent: str, rollout: Rollout) -> None:
    """Raise RolloutError when `rollout` cannot apply to `tier`/`agent` of a fleet with these tier names."""
    if tier not in tiers:
        raise RolloutError(f"unknown tier {tier[:20]!r}; configured tiers: {', '.join(tiers)}")
    if not AGENT.match(agent):
        raise RolloutError(f"invalid agent name {agent[:64]!r}")
    names: set[str] = set()
    for arm in rollout.arms:
        if arm.name in names:
            raise RolloutError(f"arm {arm.name!r} appears twice")
        names.add(arm.name)
        if arm.tier is not None and arm.tier not in tiers:
            raise RolloutError(f"arm {arm.name!r}: unknown tier {arm.tier[:20]!r}")
    if rollout.arms and sum(a.weight for a in rollout.arms) <= 0:
        raise RolloutError("the arms' weights add up to 0: at least one arm needs a weight")
    s = rollout.shadow
    if s is not None:
        if s.tier not in tiers:
            raise RolloutError(f"shadow: unknown tier {s.tier[:20]!r}")
        if s.tier == tier:
            raise RolloutError("shadow: the shadow tier must differ from the rollout's tier")
