"""Prices (`config/pricing.yaml`) and the cost of a request, in integer micro-dollars.

External models are priced as their providers publish: USD per 1M input, output and (where the provider
has them) cached-input and cache-write tokens. A local tier's price is derived from what the GPU costs and
what it does in an hour:

    USD per 1M tokens = gpu_hour_usd / tokens_per_hour * 1,000,000

`tokens_per_hour` is the tier's measured aggregate generation throughput at saturation (output tokens/s
from bench/bench_vllm.py on the tier's hardware, times 3600); `input_tokens_per_hour` (prefill) defaults
to the same figure, which prices input conservatively. An explicit `input`/`output` overrides the
derivation. Every price becomes an integer number of micro-dollars per 1M tokens when loaded (decimal
arithmetic, rounded up), and a request's cost is one integer ceiling division: no float is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.config import FleetConfig, Kind, Tier

__all__ = ["ModelPrice", "Pricing", "Tokens", "load_pricing", "micros_of_usd", "tokens_from_usage", "usd"]

_MICROS = Decimal(1_000_000)


def _micros(usd_per_mtok: Decimal) -> int:
    return int((usd_per_mtok * _MICROS).to_integral_value(rounding=ROUND_CEILING))


class Tokens(NamedTuple):  # a tuple: built twice per request, on the request path
    prompt: int
    completion: int
    cached: int = 0  # part of `prompt` read from the provider's prompt cache
    cache_write: int = 0  # part of `prompt` written to it (Anthropic bills these higher)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Micro-dollars per 1M tokens."""

    input: int
    output: int
    cached_input: int
    cache_write: int

    def plain(self, prompt: int, completion: int) -> int:
        """The cost of tokens none of which touched a prompt cache (the request path's common case)."""
        return -(-(prompt * self.input + completion * self.output) // 1_000_000)  # ceil: never under-bill

    def cost(self, t: Tokens) -> int:
        if not t.cached and not t.cache_write:  # the common case, on the request path
            return self.plain(t.prompt, t.completion)
        cached = min(t.cached, t.prompt)
        write = min(t.cache_write, t.prompt - cached)
        plain = t.prompt - cached - write
        numerator = (
            plain * self.input + cached * self.cached_input + write * self.cache_write + t.completion * self.output
        )
        return -(-numerator // 1_000_000)  # ceil: never under-bill a fraction of a micro-dollar

    def max_with(self, other: ModelPrice) -> ModelPrice:
        return ModelPrice(
            max(self.input, other.input),
            max(self.output, other.output),
            max(self.cached_input, other.cached_input),
            max(self.cache_write, other.cache_write),
        )


class _External(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Decimal = Field(ge=0, description="USD per 1M input tokens")
    output: Decimal = Field(ge=0, description="USD per 1M output tokens")
    cached_input: Decimal | None = Field(None, ge=0, description="USD per 1M cached input tokens")
    cache_write: Decimal | None = Field(None, ge=0, description="USD per 1M cache-write input tokens")

    def price(self) -> ModelPrice:
        i = _micros(self.input)
        return ModelPrice(
            i,
            _micros(self.output),
            i if self.cached_input is None else _micros(self.cached_input),
            i if self.cache_write is None else _micros(self.cache_write),
        )


class _Local(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpu_hour_usd: Decimal | None = Field(None, ge=0, description="what one GPU hour of this tier costs")
    tokens_per_hour: int | None = Field(None, gt=0, description="measured output tokens per GPU hour")
    input_tokens_per_hour: int | None = Field(None, gt=0, description="measured prefill tokens per hour")
    input: Decimal | None = Field(None, ge=0, description="override: USD per 1M input tokens")
    output: Decimal | None = Field(None, ge=0, description="override: USD per 1M output tokens")

    @model_validator(mode="after")
    def _derivable(self) -> _Local:
        derived = self.gpu_hour_usd is not None and self.tokens_per_hour is not None
        if not derived and (self.input is None or self.output is None):
            raise ValueError("a local tier needs gpu_hour_usd and tokens_per_hour, or input and output")
        return self

    def price(self) -> ModelPrice:
        def per_mtok(per_hour: int | None) -> Decimal:
            assert self.gpu_hour_usd is not None and per_hour is not None
            return self.gpu_hour_usd * _MICROS / Decimal(per_hour)

        out = self.output if self.output is not None else per_mtok(self.tokens_per_hour)
        inp = self.input if self.input is not None else per_mtok(self.input_tokens_per_hour or self.tokens_per_hour)
        i = _micros(inp)
        return ModelPrice(i, _micros(out), i, i)


class _PricingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference_model: str = Field(description="the external model every charge is also priced at (savings)")
    external: dict[str, _External] = Field(default_factory=dict)
    local: dict[str, _Local] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reference_priced(self) -> _PricingFile:
        if self.reference_model not in self.external:
            raise ValueError(f"reference_model {self.reference_model!r} has no price under external")
        return self


class Pricing:
    def __init__(self, reference_model: str, external: dict[str, ModelPrice], local: dict[str, ModelPrice]) -> None:
        self.reference_model = reference_model
        self.reference = external[reference_model]
        self.external = external
        self.local = local

    def price(self, tier: Tier, model: str | None) -> ModelPrice:
        """The price of `model` served by `tier`; KeyError when unpriced (`check` rules that out)."""
        if tier.kind is Kind.LOCAL:
            return self.local[tier.name]
        return self.external[model] if model is not None and model in self.external else self.external[tier.model]

    def check(self, config: FleetConfig) -> None:
        """Every tier that can serve must be priced: an unpriced token is a token nobody pays for."""
        missing: list[str] = []
        for name, tier in config.tiers.items():
            if tier.kind is Kind.LOCAL and name not in self.local:
                missing.append(f"local.{name}")
            if tier.kind is not Kind.LOCAL:
                missing += [f"external.{m}" for m in _models(tier) if m not in self.external]
        if missing:
            raise ValueError("pricing has no price for " + ", ".join(missing))

    def worst(self, config: FleetConfig, tier_name: str) -> ModelPrice:
        """The highest price a request for `tier_name` can be served at: its tier or any fallback."""
        tiers = config.tiers
        chain = [tiers[tier_name], *(tiers[f] for f in tiers[tier_name].fallback)]
        best = ModelPrice(0, 0, 0, 0)
        for t in chain:
            for m in _models(t):
                best = best.max_with(self.price(t, m))
        return best


def _models(tier: Tier) -> list[str]:
    """Every model name a tier may send upstream: its model, its adapters, its backends' own models."""
    return list(dict.fromkeys([tier.model, *tier.adapters, *(b.model for b in tier.backends if b.model)]))


def load_pricing(path: Path) -> Pricing:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise SystemExit(f"pricing file not found: {path} (set QLP_PRICING)") from exc
    f = _PricingFile.model_validate(raw)
    return Pricing(
        f.reference_model, {k: v.price() for k, v in f.external.items()}, {k: v.price() for k, v in f.local.items()}
    )


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def tokens_from_usage(usage: dict[str, Any] | None) -> Tokens | None:
    """Token counts from an OpenAI `usage` object (with Anthropic-style cache fields where translated)."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(p) is not int or type(c) is not int:  # parsed JSON: exactly int (a bool is no count)
        return None
    details = usage.get("prompt_tokens_details")
    if details is None and "cache_read_input_tokens" not in usage and "cache_creation_input_tokens" not in usage:
        return Tokens(max(p, 0), max(c, 0))  # no cache fields: the common case, on the request path
    details = details if isinstance(details, dict) else {}
    cached = _int(details.get("cached_tokens")) or _int(usage.get("cache_read_input_tokens"))
    write = _int(details.get("cache_creation_tokens")) or _int(usage.get("cache_creation_input_tokens"))
    return Tokens(max(p, 0), max(c, 0), cached, write)


def micros_of_usd(value: str | int | float | Decimal) -> int:
    """USD (as typed by a person: "12.50") to micro-dollars, exactly; rounded up past six decimals."""
    d = Decimal(str(value))
    if not d.is_finite() or d < 0:
        raise ValueError(f"not an amount of USD: {value!r}")
    return _micros(d)


def usd(micros: int) -> str:
    """Micro-dollars for display: exact, six decimals."""
    sign = "-" if micros < 0 else ""
    m = abs(micros)
    return f"{sign}{m // 1_000_000}.{m % 1_000_000:06d}"
