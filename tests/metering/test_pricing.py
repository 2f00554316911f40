"""Prices: the local-tier derivation, integer cost math, cache prices, and every tier priced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import FleetConfig, load_config
from gateway.metering.pricing import (
    ModelPrice,
    Pricing,
    Tokens,
    load_pricing,
    micros_of_usd,
    tokens_from_usage,
    usd,
)

ROOT = Path(__file__).resolve().parents[2]


def pricing(tmp_path: Path, doc: dict[str, Any]) -> Pricing:
    p = tmp_path / "pricing.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_pricing(p)


def test_local_tier_price_is_gpu_hour_over_tokens_per_hour(tmp_path) -> None:
    p = pricing(
        tmp_path,
        {
            "reference_model": "gpt-4",
            "external": {"gpt-4": {"input": 30, "output": 60}},
            "local": {
                "T0": {"gpu_hour_usd": "1.20", "tokens_per_hour": 9_000_000},
                "T1": {"gpu_hour_usd": 2, "tokens_per_hour": 4_000_000, "input_tokens_per_hour": 40_000_000},
                "T2": {"gpu_hour_usd": 2, "tokens_per_hour": 1, "input": 0.5, "output": 0.7},
            },
        },
    )
    # $1.20 / 9M tokens = $0.1333.. per 1M -> 133,334 micro-USD per 1M (rounded up)
    assert p.local["T0"] == ModelPrice(133_334, 133_334, 133_334, 133_334)
    assert (p.local["T1"].input, p.local["T1"].output) == (50_000, 500_000)
    assert (p.local["T2"].input, p.local["T2"].output) == (500_000, 700_000)  # overridden


def test_cost_is_one_integer_ceiling_with_cache_prices() -> None:
    sonnet = ModelPrice(3_000_000, 15_000_000, 300_000, 3_750_000)
    # 1000 prompt tokens of which 600 cache reads and 100 cache writes, 200 output tokens
    t = Tokens(1000, 200, cached=600, cache_write=100)
    assert sonnet.cost(t) == (300 * 3_000_000 + 600 * 300_000 + 100 * 3_750_000 + 200 * 15_000_000) // 1_000_000
    assert ModelPrice(150_000, 600_000, 75_000, 150_000).cost(Tokens(1, 0)) == 1  # 0.15 micro-USD bills as 1
    assert ModelPrice(0, 0, 0, 0).cost(Tokens(10, 10)) == 0
    for price in (sonnet, ModelPrice(150_000, 600_000, 75_000, 150_000), ModelPrice(1, 3, 1, 1)):
        for p, c in ((0, 0), (1, 0), (7, 13), (1000, 200)):
            assert price.plain(p, c) == price.cost(Tokens(p, c))  # the request path's short form


def test_usage_parsing_reads_openai_and_anthropic_cache_fields() -> None:
    assert tokens_from_usage(
        {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
    ) == Tokens(10, 2, 4, 0)
    assert tokens_from_usage(
        {"prompt_tokens": 10, "completion_tokens": 2, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 5}
    ) == Tokens(10, 2, 3, 5)
    assert tokens_from_usage({"prompt_tokens": "10", "completion_tokens": 2}) is None
    assert tokens_from_usage({"prompt_tokens": True, "completion_tokens": 2}) is None  # a bool is no count
    assert tokens_from_usage({"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": None}) == Tokens(
        10, 2
    )
    assert tokens_from_usage({"prompt_tokens": -1, "completion_tokens": 2}) == Tokens(0, 2)
    assert tokens_from_usage(None) is None


def test_usd_amounts_are_exact() -> None:
    assert micros_of_usd("12.50") == 12_500_000 and micros_of_usd("0.0000001") == 1
    assert usd(31) == "0.000031" and usd(12_500_000) == "12.500000" and usd(-5) == "-0.000005"
    with pytest.raises(ValueError):
        micros_of_usd("-1")


def test_every_configured_tier_must_be_priced(tmp_path) -> None:
    p = pricing(
        tmp_path,
        {
            "reference_model": "gpt-4",
            "external": {"gpt-4": {"input": 30, "output": 60}},
            "local": {"T0": {"input": 0, "output": 1}},
        },
    )
    cfg = FleetConfig.model_validate(
        {
            "tiers": {
                "T0": {"model": "m", "fallback": ["T1", "T3"]},
                "T1": {"model": "m"},
                "T3": {"kind": "openai", "model": "gpt-4o"},
            }
        }
    )
    with pytest.raises(ValueError, match=r"local\.T1, external\.gpt-4o"):
        p.check(cfg)


def test_worst_case_price_covers_the_fallback_chain(tmp_path) -> None:
    p = pricing(
        tmp_path,
        {
            "reference_model": "gpt-4",
            "external": {"gpt-4": {"input": 30, "output": 60}},
            "local": {"T0": {"input": 0, "output": 1}},
        },
    )
    cfg = FleetConfig.model_validate(
        {"tiers": {"T0": {"model": "m", "fallback": ["T3"]}, "T3": {"kind": "openai", "model": "gpt-4"}}}
    )
    assert p.worst(cfg, "T0") == ModelPrice(30_000_000, 60_000_000, 30_000_000, 30_000_000)


def test_shipped_pricing_prices_the_shipped_fleet() -> None:
    p = load_pricing(ROOT / "config/pricing.yaml")
    p.check(load_config(ROOT / "config/tiers.yaml"))
    assert p.reference_model == "gpt-4" and p.reference.output == 60_000_000
