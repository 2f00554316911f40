"""Where a request goes: tier resolution and the backend choice, as pure functions of their inputs.

Nothing here does I/O or reads a clock: health and load come in as arguments, randomness as a number,
so every rule is testable without a network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.config import Backend, FleetConfig, Policy, Tier
from gateway.errors import InvalidRequest, NotFound

__all__ = ["BackendState", "Target", "TierResolver", "choose_backend"]


@dataclass(frozen=True, slots=True)
class Target:
    """The tier chosen for a request and the model name to send upstream within it."""

    tier: Tier
    model: str
    adapter: str | None  # the adapter named by `model`, when one applies


@dataclass(frozen=True, slots=True)
class BackendState:
    available: bool  # the breaker admits a request now
    inflight: int = 0


class TierResolver:
    """Header, then `model` (tier name, alias or adapter; else the model a tier serves, the first such tier),
    then the default tier: for a request without `model`, or for any model when the fleet is a catch-all."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self._by_model: dict[str, str] = {}
        for name, tier in config.tiers.items():
            self._by_model[name.lower()] = name
            for key in (*tier.aliases, *tier.adapters):
                self._by_model[key] = name
        for name, tier in config.tiers.items():  # `model: gpt-4` reaches the tier serving gpt-4
            self._by_model.setdefault(tier.model, name)

    def tier_of(self, header_tier: str | None, model: str | None) -> Tier:
        tiers = self.config.tiers
        if header_tier is not None:
            name = header_tier.strip().upper()
            if name not in tiers:
                raise InvalidRequest(
                    f"unknown tier {header_tier[:20]!r}; configured tiers: {', '.join(tiers)}",
                    param="X-QLP-Tier",
                    code="unknown_tier",
                )
            return tiers[name]
        if model is not None:
            name_or_none = self._by_model.get(model) or self._by_model.get(model.lower())
            if name_or_none is not None:
                return tiers[name_or_none]
            if not self.config.catch_all:  # OpenAI's answer to a model it does not serve
                raise NotFound(
                    f"The model {model[:100]!r} does not exist; GET /v1/models lists the models served "
                    "here, or send X-QLP-Tier",
                    param="model",
                )
        if self.config.default_tier is None:
            raise NotFound(
                f"The model {model[:100]!r} does not exist; send X-QLP-Tier or use a tier alias"
                if model
                else "no model given and no default tier configured; send X-QLP-Tier",
                param="model",
            )
        return tiers[self.config.default_tier]

    def resolve(self, header_tier: str | None, model: str | None, agent: str | None) -> Target:
        tier = self.tier_of(header_tier, model)
        return target_in(tier, model, agent)


def target_in(tier: Tier, model: str | None, agent: str | None) -> Target:
    """The upstream model within a tier: the agent's adapter, else an adapter named by `model`, else the
    tier's model. Used again when a request falls back to another tier."""
    if agent is not None and agent in tier.agents:
        adapter = tier.agents[agent]
        return Target(tier, adapter, adapter)
    if model is not None and model in tier.adapters:
        return Target(tier, model, model)
    return Target(tier, tier.model, None)


def choose_backend(
    backends: Sequence[Backend],
    state: Mapping[str, BackendState],
    policy: Policy,
    rnd: float,
    exclude: frozenset[str] = frozenset(),
) -> Backend | None:
    """Pick one available backend, or None. `rnd` is uniform in [0, 1)."""
    candidates = [b for b in backends if b.name not in exclude and state.get(b.name, BackendState(True)).available]
    if not candidates:
        return None
    if policy is Policy.LEAST_LOADED:
        # Fewest in-flight per unit of weight; ties broken by `rnd` so equal backends share load.
        def load(b: Backend) -> float:
            return state.get(b.name, BackendState(True)).inflight / b.weight

        best = min(load(b) for b in candidates)
        candidates = [b for b in candidates if load(b) == best]
        return candidates[min(int(rnd * len(candidates)), len(candidates) - 1)]
    total = sum(b.weight for b in candidates)
    point = rnd * total
    for b in candidates:
        point -= b.weight
        if point < 0:
            return b
    return candidates[-1]
