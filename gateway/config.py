"""The fleet config (`config/tiers.yaml`): tiers, their backends, aliases, adapters and fallbacks.

Validated once at start-up; an invalid file stops the process with a message naming the field.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.capture.config import CaptureConfig
from gateway.providers import Provider, provider_for
from gateway.rollout.model import Rollout, RolloutError, check_rollout

__all__ = [
    "Backend",
    "FleetConfig",
    "Kind",
    "Policy",
    "RetryConfig",
    "Tier",
    "Timeouts",
    "backend_provider",
    "load_config",
]

TIER_NAME = re.compile(r"^T[0-9]$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Kind(enum.StrEnum):
    LOCAL = "local"  # a model server of ours (vLLM, on GPUs or CPUs)
    OPENAI = "openai"  # an external OpenAI-compatible API
    AZURE = "azure"  # Azure OpenAI: deployment URLs, api-version, api-key header
    ANTHROPIC = "anthropic"  # Anthropic Messages API, translated to and from OpenAI's


class Policy(enum.StrEnum):
    WEIGHTED = "weighted"  # random, proportional to weight
    LEAST_LOADED = "least_loaded"  # fewest in-flight requests per unit of weight


class Timeouts(_Model):
    """Seconds. Defaults suit LLM streams: generation may take minutes, but a silent peer is dead."""

    connect: float = Field(3.0, gt=0, description="TCP connect to the upstream")
    first_byte: float = Field(120.0, gt=0, description="request sent -> response headers (and first chunk)")
    idle: float = Field(60.0, gt=0, description="longest silence between two stream chunks")
    total: float = Field(900.0, gt=0, description="whole upstream exchange")


class RetryConfig(_Model):
    max_attempts: int = Field(
        3, ge=1, le=10, description="upstream attempts per request, retries and fallbacks together"
    )
    backoff_base: float = Field(0.05, ge=0, description="first backoff (s); doubles, full jitter")
    backoff_max: float = Field(2.0, ge=0)
    max_retry_after: float = Field(5.0, ge=0, description="longest Retry-After honoured before the first byte")


class BreakerConfig(_Model):
    failures: int = Field(5, ge=1, description="consecutive failures that eject a backend")
    cooldown: float = Field(10.0, gt=0, description="seconds ejected before a half-open probe")


class Backend(_Model):
    name: str
    base_url: str = Field(description="OpenAI-style base URL, including /v1")
    weight: float = Field(1.0, gt=0)
    model: str | None = Field(None, description="model name the backend serves; defaults to the tier's")
    api_key_secret: str | None = Field(None, description="secret holding this backend's API key")
    health_path: str | None = Field(None, description="GET path (from the host root) probed for readiness")
    deployment: str | None = Field(None, description="Azure OpenAI deployment name (kind: azure; required there)")
    api_version: str | None = Field(
        None, description="Azure `api-version` query / Anthropic `anthropic-version` header"
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")


class Tier(_Model):
    name: str = ""
    description: str = ""
    kind: Kind = Kind.LOCAL
    model: str = Field(description="default model name sent upstream when no adapter applies")
    aliases: tuple[str, ...] = ()
    adapters: tuple[str, ...] = Field((), description="adapter names this tier serves (routable by `model`)")
    agents: dict[str, str] = Field(default_factory=dict, description="agent role -> adapter name")
    fallback: tuple[str, ...] = ()
    policy: Policy = Policy.WEIGHTED
    backends: tuple[Backend, ...] = Field(default=(), description="empty: the tier is configured but unserved")
    timeouts: Timeouts = Timeouts()
    max_tokens_default: int = Field(1024, ge=1, description="assumed completion size when a request sets none")


class FleetConfig(_Model):
    default_tier: str | None = Field("T0", description="the tier of a request that names neither tier nor model")
    catch_all: bool = Field(False, description="a `model` no tier lists goes to default_tier (off: 404, as OpenAI)")
    max_n: int = Field(8, ge=1)
    max_tokens_limit: int = Field(32768, ge=1)
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_interval: float = Field(5.0, gt=0, description="seconds between active backend probes")
    tiers: dict[str, Tier]
    capture: CaptureConfig = CaptureConfig()
    rollouts: dict[str, Rollout] = Field(
        default_factory=dict, description="'<tier>/<agent>' -> arms and shadow (docs/rollout.md)"
    )

    @model_validator(mode="before")
    @classmethod
    def _name_tiers(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("tiers"), dict):
            data = dict(data)
            data["tiers"] = {k: ({**v, "name": k} if isinstance(v, dict) else v) for k, v in data["tiers"].items()}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> FleetConfig:
        names = set(self.tiers)
        for name, tier in self.tiers.items():
            if not TIER_NAME.match(name):
                raise ValueError(f"tier {name!r}: tier names are T0..T9")
            for fb in tier.fallback:
                if fb not in names or fb == name:
                    raise ValueError(f"tier {name}: fallback {fb!r} is not another configured tier")
            for agent, adapter in tier.agents.items():
                if adapter not in tier.adapters:
                    raise ValueError(f"tier {name}: agent {agent!r} names adapter {adapter!r} not in adapters")
            seen: set[str] = set()
            for b in tier.backends:
                if b.name in seen:
                    raise ValueError(f"tier {name}: duplicate backend name {b.name!r}")
                seen.add(b.name)
                try:
                    backend_provider(tier, b)
                except ValueError as exc:
                    raise ValueError(f"tier {name} backend {b.name!r}: {exc}") from exc
        for tier_name in self.capture.targets:
            if tier_name not in names:
                raise ValueError(f"capture.targets: {tier_name!r} is not a configured tier")
        for key, rollout in self.rollouts.items():
            tier_name, sep, agent = key.partition("/")
            try:
                if not sep:
                    raise RolloutError("keys are '<tier>/<agent>', e.g. 'T0/developer'")
                check_rollout(self.tiers, tier_name, agent, rollout)
            except RolloutError as exc:
                raise ValueError(f"rollouts[{key!r}]: {exc}") from exc
        if self.default_tier is not None and self.default_tier not in names:
            raise ValueError(f"default_tier {self.default_tier!r} is not a configured tier")
        if self.catch_all and self.default_tier is None:
            raise ValueError("catch_all needs a default_tier to send unknown models to")
        keys: dict[str, str] = {}
        for name, tier in self.tiers.items():
            for key in (*tier.aliases, *tier.adapters):
                if keys.setdefault(key, name) != name:
                    raise ValueError(f"model name {key!r} is claimed by tiers {keys[key]} and {name}")
        return self


def backend_key(tier: str, backend: str) -> str:
    """ "tier/backend": backend names are unique per tier, so breakers, providers and keys are kept under it."""
    return f"{tier}/{backend}"


def backend_provider(tier: Tier, backend: Backend) -> Provider:
    """The backend's provider, from configuration only (see gateway/providers)."""
    return provider_for(
        tier.kind,
        {
            "deployment": backend.deployment,
            "api_version": backend.api_version,
            "max_tokens_default": tier.max_tokens_default,
        },
    )


def load_config(path: Path) -> FleetConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise SystemExit(f"fleet config not found: {path} (set QLP_CONFIG)") from exc
    return FleetConfig.model_validate(raw)
