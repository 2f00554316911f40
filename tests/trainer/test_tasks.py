"""trainer/tasks.py: the signature-json family is real, deterministic, disjointly split, and its check
grades exactly what `ast` says, from the request alone."""

from __future__ import annotations

import json

import pytest

from trainer.loop import gate
from trainer.tasks import TASKS, signature_answer, split_of

FAMILY = TASKS["signature-json"]


def _ask(code: str) -> list[dict[str, str]]:
    from trainer.tasks import SIGNATURE_INSTRUCTION

    return [{"role": "user", "content": SIGNATURE_INSTRUCTION.format(code=code)}]


def test_the_family_has_enough_real_tasks_and_every_reference_passes_its_check() -> None:
    tasks = FAMILY.tasks()
    assert len(tasks) >= 600, "teach + held-out + A/B need several hundred distinct functions"
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert [t.task_id for t in tasks] == [t.task_id for t in FAMILY.tasks()], "deterministic"
    assert all(FAMILY.check(t.messages, t.reference) for t in tasks)
    assert {"textwrap.dedent", "shutil.copyfile"} <= {t.task_id for t in tasks}


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (
            "def f(a, b=1, *args, c, d=2, **kw):\n    ...",
            {"name": "f", "params": ["a", "b", "*args", "c", "d", "**kw"], "required": ["a", "c"]},
        ),
        ("def g(x, /, y=None, *, z):\n    ...", {"name": "g", "params": ["x", "y", "z"], "required": ["x", "z"]}),
        ("def h():\n    ...", {"name": "h", "params": [], "required": []}),
        ("async def k(s: str = 'a,b') -> int:\n    ...", {"name": "k", "params": ["s"], "required": []}),
    ],
)
def test_signature_answer_reads_every_kind_of_parameter(code: str, expected: dict[str, object]) -> None:
    assert signature_answer(code) == expected


def test_the_check_accepts_exactly_the_right_object_in_any_layout() -> None:
    messages = _ask("def f(a, b=1):\n    ...")
    right = {"name": "f", "params": ["a", "b"], "required": ["a"]}
    for reply in (
        json.dumps(right),
        json.dumps(right, indent=2),
        f"```json\n{json.dumps(right)}\n```",
        f"  {json.dumps(right)}\n",
    ):
        assert FAMILY.check(messages, reply), reply
    for reply in (
        "",
        "The function f takes a and b.",
        json.dumps({**right, "required": ["a", "b"]}),
        json.dumps({**right, "extra": 1}),
        json.dumps(right)[:-1],
        f"Here: {json.dumps(right)}",
        json.dumps([right]),
    ):
        assert not FAMILY.check(messages, reply), reply
    assert not FAMILY.check([{"role": "user", "content": "no code here"}], json.dumps(right))
    assert FAMILY.check([("user", messages[0]["content"])], json.dumps(right)), "(role, content) pairs too"


def test_split_is_disjoint_stable_and_by_content_only() -> None:
    bounds = [("teach", 0.6), ("heldout", 0.8), ("ab", 1.0)]
    ids = [t.task_id for t in FAMILY.tasks()]
    first = {i: split_of(i, "salt", bounds) for i in ids}
    assert {i: split_of(i, "salt", bounds) for i in reversed(ids)} == first
    counts = {name: sum(v == name for v in first.values()) for name, _ in bounds}
    assert all(c > 0.1 * len(ids) for c in counts.values()), counts
    assert {i: split_of(i, "other", bounds) for i in ids} != first, "the salt draws another split"


def test_the_gate_blocks_a_drop_in_task_success_even_when_the_loss_improves() -> None:
    assert gate(1.0, 0.5, 0.02, current_success=0.4, new_success=0.6).passed
    blocked = gate(1.0, 0.5, 0.02, current_success=0.6, new_success=0.4)
    assert not blocked.passed and "task success 0.400" in blocked.why_not()
    assert gate(1.0, 0.5, 0.02, current_success=0.6, new_success=0.55, max_success_drop=0.1).passed
    assert not gate(1.0, 1.5, 0.02, current_success=0.1, new_success=0.9).passed, "the loss still counts"
    assert gate(1.0, 0.9, 0.02).passed, "no success check: the loss alone"
