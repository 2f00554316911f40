"""Helpers for model-server tests: reading /metrics and waiting on a condition the server exposes."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["metric", "wait_until"]


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll an observable server condition until it holds; fail after `timeout_s`.

    This waits for a state the server reports (e.g. no running requests), not for time to pass: it returns
    as soon as the condition holds and fails loudly if it never does.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        time.sleep(0.05)
