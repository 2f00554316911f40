"""The learning-loop proof (bench/bench_proof.py) end to end on a few tasks: teaching traffic through T3 (the
loopback teacher), captured and graded, `qlp loop` with the task-success gate publishing a canary into the
session's real vLLM, the held-out comparison and the A/B split through the gateway, and the report. The
lift itself is measured by `make proof`; this checks that every figure of it is produced and adds up."""

from __future__ import annotations

from bench.bench_proof import Scale, prove, tables
from tests.conftest import RunningVllm


def test_the_proof_pipeline_runs_end_to_end_on_a_few_tasks(vllm_server: RunningVllm, redis_url: str) -> None:
    scale = Scale.from_env({"QLP_PROOF_SCALE": "smoke"})
    res = prove(scale, vllm_url=vllm_server.url, redis_url=redis_url)

    assert res["teach"] == {"tasks": scale.teach, "teacher_correct": scale.teach, "captured": scale.teach}
    (loop,) = res["loops"]
    assert loop["exit"] == 0 and loop["gate"]["passed"]
    assert loop["task_success"]["check"] == "signature-json" and loop["task_success"]["tasks"] >= 1
    assert loop["training"]["steps"] == scale.max_steps
    canary = loop["steps"]["canary"]["adapter"]

    assert {k: v["model"] for k, v in res["held_out"].items()} == {"base": "SmolLM2-135M-Instruct", "adalora": canary}
    for h in res["held_out"].values():
        assert h["tasks"] == scale.heldout and 0 <= h["ci95"][0] <= h["rate"] <= h["ci95"][1] <= 1

    # A/B: every task booked on T0 under one of the two arms, every one with its outcome.
    t0 = res["report"]["T0"]["data"]
    assert sum(g["requests"] for g in t0) == scale.ab == sum(g["feedback"] for g in t0)
    assert sum(g["successes"] for g in t0) == res["ab"]["successes"]
    assert {g["arm"] for g in t0} <= {"baseline", "signature-adalora-v1"}
    # The teacher: all correct, priced as GPT-4, which is also the counterfactual.
    (t3,) = res["report"]["T3"]["data"]
    assert t3["requests"] == scale.teach and t3["success_rate"] == 1.0
    assert t3["cost_micros"] == t3["counterfactual_micros"] > 0
    assert "held-out" in tables(res)
