"""Which arm a workflow lands on: a pure function of the arms and a hash of (tier, agent, workflow).

Sticky: the same workflow always hashes to the same point in [0, 1), and the arms cover [0, 1) in their
declared order, each with its share of the total weight. So a workflow stays on its arm for as long as the
weights stay; when a canary grows from 10% to 20%, only the workflows in the slice that moves change arm,
and they all move to the canary (none bounce between arms). Requests without a workflow id hash their
request id instead: each one is its own draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from gateway.rollout.model import Arm

__all__ = ["pick", "point"]

_SCALE = float(1 << 64)


def point(*parts: str) -> float:
    """A uniform, stable number in [0, 1) for the parts (blake2b: fast, and not steerable by choosing ids
    that collide in a weaker hash)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def pick(arms: Sequence[Arm], at: float) -> Arm | None:
    """The arm whose slice of [0, 1) holds `at`; None when no arm has weight."""
    total = sum(a.weight for a in arms)
    if total <= 0:
        return None
    edge = 0.0
    last: Arm | None = None
    for arm in arms:
        if arm.weight <= 0:
            continue
        edge += arm.weight / total
        last = arm
        if at < edge:
            return arm
    return last  # float rounding at the top end
