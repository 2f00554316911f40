"""Rollout fixtures: the test fleet of tests/metered.py with a T3 tier (upstream c, OpenAI kind)."""

from __future__ import annotations

from typing import Any

from tests.fakes.upstream import FakeUpstream
from tests.metered import fleet


def fleet3(ups: dict[str, FakeUpstream], **over: Any) -> dict[str, Any]:
    cfg = fleet(ups, **over)
    cfg["tiers"]["T3"] = {
        "kind": "openai",
        "model": "gpt-4",
        "aliases": ["qlp-t3"],
        "backends": [{"name": "c", "base_url": ups["c"].base_url}],
    }
    return cfg
