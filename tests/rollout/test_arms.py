"""The arm choice: weights honoured, sticky per workflow, canaries that grow only take workflows."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.rollout.arms import pick, point
from gateway.rollout.model import Arm, Rollout
from gateway.rollout.routes import BASELINE, with_canary

ARMS = (Arm(name="v1", weight=70), Arm(name="v2", weight=20, adapter="dev-v2"), Arm(name="gpt4", weight=10, tier="T3"))


def _arm_of(arms: tuple[Arm, ...], workflow: str) -> str:
    arm = pick(arms, point("T0", "developer", workflow))
    assert arm is not None
    return arm.name


def test_ten_thousand_workflows_land_within_two_percent_of_the_weights() -> None:
    counts = Counter(_arm_of(ARMS, f"wf-{i}") for i in range(10_000))
    for arm in ARMS:
        assert abs(counts[arm.name] / 10_000 - arm.weight / 100) < 0.02, counts


def test_a_workflow_always_lands_on_the_same_arm() -> None:
    for i in range(500):
        first = _arm_of(ARMS, f"wf-{i}")
        assert all(_arm_of(ARMS, f"wf-{i}") == first for _ in range(5))


def test_growing_a_canary_moves_workflows_only_onto_it() -> None:
    before = (Arm(name="v1", weight=90), Arm(name="v2", weight=10))
    after = (Arm(name="v1", weight=80), Arm(name="v2", weight=20))
    moved = 0
    for i in range(5_000):
        a, b = _arm_of(before, f"wf-{i}"), _arm_of(after, f"wf-{i}")
        if a != b:
            assert (a, b) == ("v1", "v2")
            moved += 1
    assert abs(moved / 5_000 - 0.10) < 0.02


def test_an_arm_of_weight_zero_receives_nothing() -> None:
    arms = (Arm(name="on", weight=1), Arm(name="off", weight=0))
    assert {_arm_of(arms, f"wf-{i}") for i in range(2_000)} == {"on"}
    assert pick((Arm(name="off", weight=0),), 0.5) is None


def test_the_hash_separates_tiers_and_agents() -> None:
    # The same workflow in two rollouts is two independent draws, not the same slice twice.
    same = sum(
        (point("T0", "developer", f"wf-{i}") < 0.5) == (point("T1", "developer", f"wf-{i}") < 0.5) for i in range(4_000)
    )
    assert 1_700 < same < 2_300


@pytest.mark.parametrize("weight", [10.0, 25.0, 50.0])
def test_a_canary_takes_its_percent_and_the_others_keep_their_proportions(weight: float) -> None:
    current = Rollout(arms=(Arm(name="v1", weight=3), Arm(name="v2", weight=1)))
    r = with_canary(current, Arm(name="v3", weight=weight, adapter="dev-v3"))
    w = {a.name: a.weight for a in r.arms}
    assert [a.name for a in r.arms] == ["v1", "v2", "v3"]  # the canary last: it grows into the top slice
    assert w["v3"] == weight and w["v1"] == pytest.approx(3 * w["v2"])
    assert sum(w.values()) == pytest.approx(100)


def test_a_canary_without_a_rollout_splits_against_the_usual_routing() -> None:
    r = with_canary(None, Arm(name="v1", weight=10, adapter="dev-v1"))
    assert [(a.name, a.weight, a.adapter) for a in r.arms] == [(BASELINE, 90, None), ("v1", 10, "dev-v1")]
    full = with_canary(r, Arm(name="v1", weight=100, adapter="dev-v1"))
    assert [(a.name, a.weight) for a in full.arms] == [("v1", 100)]
