"""Routing policy and breaker: pure functions, no network, no clock."""

from __future__ import annotations

import collections

import pytest
from pydantic import ValidationError

from gateway.breaker import Breaker, BreakerState
from gateway.config import FleetConfig, Policy
from gateway.errors import InvalidRequest, NotFound
from gateway.routing import BackendState, TierResolver, choose_backend

CONFIG = FleetConfig.model_validate(
    {
        "default_tier": "T0",
        "tiers": {
            "T0": {
                "model": "base",
                "aliases": ["qlp-t0"],
                "adapters": ["t0-dev", "t0-test"],
                "agents": {"developer": "t0-dev"},
                "fallback": ["T1"],
                "backends": [
                    {"name": "x", "base_url": "http://127.0.0.1:1/v1", "weight": 3},
                    {"name": "y", "base_url": "http://127.0.0.1:2/v1", "weight": 1},
                ],
            },
            "T1": {
                "model": "base1",
                "aliases": ["qlp-t1"],
                "adapters": ["t1-arch"],
                "backends": [{"name": "z", "base_url": "http://127.0.0.1:3/v1"}],
            },
        },
    }
)


def test_header_tier_wins_over_model_alias() -> None:
    t = TierResolver(CONFIG).resolve("T1", "qlp-t0", None)
    assert t.tier.name == "T1" and t.model == "base1"


def test_header_tier_is_case_insensitive() -> None:
    assert TierResolver(CONFIG).resolve("t1", None, None).tier.name == "T1"


def test_model_alias_selects_tier_and_sends_tier_model() -> None:
    t = TierResolver(CONFIG).resolve(None, "qlp-t1", None)
    assert (t.tier.name, t.model, t.adapter) == ("T1", "base1", None)


def test_adapter_name_selects_its_tier_and_is_sent_upstream() -> None:
    t = TierResolver(CONFIG).resolve(None, "t1-arch", None)
    assert (t.tier.name, t.model, t.adapter) == ("T1", "t1-arch", "t1-arch")


def test_the_model_a_tier_serves_selects_that_tier() -> None:
    t = TierResolver(CONFIG).resolve(None, "base1", None)
    assert (t.tier.name, t.model, t.adapter) == ("T1", "base1", None)


def test_unknown_model_is_404_as_openai_answers() -> None:
    with pytest.raises(NotFound) as e:
        TierResolver(CONFIG).resolve(None, "gpt-4", None)
    assert e.value.status == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    assert "/v1/models" in e.value.message


def test_no_model_goes_to_default_tier() -> None:
    t = TierResolver(CONFIG).resolve(None, None, None)
    assert (t.tier.name, t.model) == ("T0", "base")


def test_catch_all_sends_unknown_models_to_default_tier() -> None:
    t = TierResolver(CONFIG.model_copy(update={"catch_all": True})).resolve(None, "gpt-4", None)
    assert (t.tier.name, t.model) == ("T0", "base")


def test_catch_all_needs_a_default_tier() -> None:
    with pytest.raises(ValueError, match="catch_all"):
        FleetConfig.model_validate({"catch_all": True, "default_tier": None, "tiers": {"T0": {"model": "m"}}})


def test_unknown_model_without_default_tier_is_404() -> None:
    cfg = CONFIG.model_copy(update={"default_tier": None})
    with pytest.raises(NotFound) as e:
        TierResolver(cfg).resolve(None, "gpt-4", None)
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_unknown_tier_header_is_400() -> None:
    with pytest.raises(InvalidRequest) as e:
        TierResolver(CONFIG).resolve("T7", None, None)
    assert e.value.status == 400 and e.value.code == "unknown_tier"


def test_agent_header_picks_that_agents_adapter() -> None:
    t = TierResolver(CONFIG).resolve("T0", "whatever", "developer")
    assert (t.model, t.adapter) == ("t0-dev", "t0-dev")


def test_agent_without_adapter_in_tier_gets_tier_model() -> None:
    assert TierResolver(CONFIG).resolve("T1", None, "developer").model == "base1"


def test_weights_split_traffic_in_proportion() -> None:
    backends = CONFIG.tiers["T0"].backends
    state = {"x": BackendState(True), "y": BackendState(True)}
    counts = collections.Counter(
        choose_backend(backends, state, Policy.WEIGHTED, i / 10_000).name
        for i in range(10_000)  # type: ignore[union-attr]
    )
    assert counts["x"] == 7500 and counts["y"] == 2500


def test_unavailable_backend_is_never_chosen() -> None:
    backends = CONFIG.tiers["T0"].backends
    state = {"x": BackendState(False), "y": BackendState(True)}
    assert {choose_backend(backends, state, Policy.WEIGHTED, i / 100).name for i in range(100)} == {"y"}  # type: ignore[union-attr]


def test_no_available_backend_gives_none() -> None:
    backends = CONFIG.tiers["T0"].backends
    assert choose_backend(backends, {"x": BackendState(False), "y": BackendState(False)}, Policy.WEIGHTED, 0.5) is None


def test_excluded_backends_are_skipped() -> None:
    backends = CONFIG.tiers["T0"].backends
    b = choose_backend(backends, {}, Policy.WEIGHTED, 0.0, frozenset({"x"}))
    assert b is not None and b.name == "y"


def test_least_loaded_prefers_fewest_inflight_per_weight() -> None:
    backends = CONFIG.tiers["T0"].backends
    # x: 6 in flight / weight 3 = 2; y: 1 / 1 = 1 -> y
    b = choose_backend(backends, {"x": BackendState(True, 6), "y": BackendState(True, 1)}, Policy.LEAST_LOADED, 0.9)
    assert b is not None and b.name == "y"


def test_breaker_opens_after_consecutive_failures() -> None:
    br = Breaker(failures_to_open=3, cooldown=10)
    for _ in range(2):
        br.failure(0.0)
    assert br.view(0.0).available
    br.failure(0.0)
    assert br.current(0.0) is BreakerState.OPEN and not br.view(5.0).available


def test_breaker_success_resets_the_failure_count() -> None:
    br = Breaker(failures_to_open=2, cooldown=10)
    br.failure(0.0)
    br.success()
    br.failure(0.0)
    assert br.current(0.0) is BreakerState.CLOSED


def test_breaker_half_open_admits_exactly_one_probe() -> None:
    br = Breaker(failures_to_open=1, cooldown=10)
    br.failure(0.0)
    assert br.view(10.0).available  # cooldown over: half-open
    br.acquire(10.0)
    assert br.current(10.0) is BreakerState.HALF_OPEN and not br.view(10.0).available


def test_breaker_probe_success_closes_and_failure_reopens() -> None:
    br = Breaker(failures_to_open=1, cooldown=10)
    br.failure(0.0)
    br.acquire(10.0)
    br.release()
    br.failure(10.0)
    assert br.current(11.0) is BreakerState.OPEN
    br.acquire(20.0)
    br.release()
    br.success()
    assert br.current(20.0) is BreakerState.CLOSED and br.view(20.0).available


@pytest.mark.parametrize(
    "bad",
    [
        {"tiers": {"T0": {"model": "m", "fallback": ["T9"]}}},
        {"default_tier": "T5", "tiers": {"T0": {"model": "m"}}},
        {"tiers": {"X": {"model": "m"}}},
        {"tiers": {"T0": {"model": "m", "agents": {"dev": "missing"}}}},
        {"tiers": {"T0": {"model": "m", "aliases": ["a"]}, "T1": {"model": "m", "aliases": ["a"]}}},
        {"tiers": {"T0": {"model": "m", "backends": [{"name": "b", "base_url": "ftp://x"}]}}},
    ],
)
def test_invalid_fleet_config_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        FleetConfig.model_validate(bad)
