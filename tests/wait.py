"""Waiting in tests: poll a condition until it holds, never sleep a guessed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["eventually", "eventually_async"]

T = TypeVar("T")


def eventually(fn: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.02) -> T:
    """Poll `fn` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value {value!r}")
        time.sleep(interval)


async def eventually_async(
    fn: Callable[[], T], within: float = 10.0, what: str = "condition", interval: float = 0.005
) -> T:
    """`eventually` inside an event loop: the loop keeps running (and so does what is awaited) between polls."""
    deadline = time.monotonic() + within
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}; last value {value!r}")
        await asyncio.sleep(interval)
