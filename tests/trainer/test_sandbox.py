"""The pass@1 sandbox: tests pass or fail on their merits; runaway code is stopped; no network."""

from __future__ import annotations

import os

import pytest

from trainer.evaluate import humaneval_program
from trainer.records import human_eval_examples, human_eval_problems
from trainer.sandbox import Limits, detect_isolation, run_program


@pytest.fixture(scope="module")
def problems():
    return human_eval_problems()


def test_canonical_solutions_pass_and_wrong_ones_fail(problems) -> None:
    seeds = {e.task_id: e for e in human_eval_examples(problems)}
    for task_id in list(problems)[:12]:
        # The seed's reply (the whole function in a code block) is what the developer adapter learns.
        assert run_program(humaneval_program(problems[task_id], seeds[task_id].response)).passed, task_id
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    result = run_program(humaneval_program(problems["HumanEval/0"], wrong))
    assert result.status == "failed" and "AssertionError" in result.detail


def test_a_bare_body_completion_is_checked_too(problems) -> None:
    p = problems["HumanEval/0"]
    assert run_program(humaneval_program(p, p["canonical_solution"])).passed


def test_endless_loop_is_stopped_at_the_timeout() -> None:
    result = run_program("while True:\n    pass\n", Limits(timeout_s=1.5))
    assert result.status == "timeout"
    assert result.seconds < 10


def test_network_is_unreachable() -> None:
    code = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)\n"
    result = run_program(code)
    assert result.status == "failed"
    assert "unreachable" in result.detail.lower() or "disabled" in result.detail.lower()


def test_memory_is_capped() -> None:
    result = run_program("x = bytearray(1 << 31)\n", Limits(memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.detail


def test_fork_bomb_hits_the_process_cap() -> None:
    iso = detect_isolation()
    if iso.uid is None and os.geteuid() == 0:
        pytest.skip("running as root with no usable unprivileged interpreter: RLIMIT_NPROC does not bind root")
    code = "import os, time\nfor i in range(200):\n    if os.fork() == 0:\n        time.sleep(3); os._exit(0)\n"
    result = run_program(code, Limits(timeout_s=5))
    assert result.status == "failed" and (
        "Resource temporarily unavailable" in result.detail or "BlockingIOError" in result.detail
    )


def test_program_runs_in_an_empty_temporary_directory_with_an_empty_environment() -> None:
    code = (
        "import os, sys\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        "assert 'QLP_ADMIN_KEY' not in os.environ and 'HTTP_PROXY' not in os.environ\n"
    )
    os.environ["QLP_ADMIN_KEY"] = "must-not-leak"
    try:
        assert run_program(code).passed
    finally:
        del os.environ["QLP_ADMIN_KEY"]
