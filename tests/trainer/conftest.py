"""Fixtures for the trainer: synthetic capture files, one short real AdaLoRA run on the real base model
(shared by the whole session), its plain-LoRA export, and the session's real vLLM as the model server.

The run is deliberately tiny (12 training examples of ~60 tokens, 6 optimizer steps, q/v projections,
rank 4 -> 2) so that CI trains for well under two minutes on 2 cores, yet it goes through every AdaLoRA
phase: warm-up (step 1), pruning (steps 2-4), final allocation (step 5), frozen pattern (step 6).
The learning rate is high so that 6 steps visibly change the model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningVllm

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "base"
QLP = Path(sys.executable).with_name("qlp")
BASE_NAME = "SmolLM2-135M-Instruct"


def capture_record(
    i: int, user: str, response: str, *, agent: str = "developer", outcome: str | None = "success"
) -> dict[str, Any]:
    """A record in the gateway's capture format (docs/trainer.md)."""
    return {
        "request_id": f"req-{i}",
        "time": "2025-01-01T00:00:00Z",
        "tier": "T0",
        "agent": agent,
        "workflow": None,
        "backend": "t0-local",
        "model": BASE_NAME,
        "messages": [{"role": "user", "content": user}],
        "response": response,
        "outcome": outcome,
        "usage": {"prompt_tokens": 10, "completion_tokens": 20},
    }


def developer_records() -> list[dict[str, Any]]:
    """15 distinct successful developer exchanges, plus a duplicate, another agent's and a failure."""
    recs = []
    for name, op in (("add", "+"), ("sub", "-"), ("mul", "*")):
        for k in range(2, 7):
            recs.append(
                capture_record(
                    len(recs),
                    f"Write a Python function {name}_{k}(x) that returns x {op} {k}.",
                    f"QLP: here it is.\n```python\ndef {name}_{k}(x):\n    return x {op} {k}\n```",
                )
            )
    recs.append({**recs[0], "request_id": "dup"})  # the same exchange captured twice
    recs.append({**recs[1], "request_id": "arch", "agent": "architect"})
    recs.append({**recs[2], "request_id": "fail", "outcome": "failure", "response": "oops"})
    return recs


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_overrides(capture: Path, output_dir: Path) -> dict[str, Any]:
    return dict(
        data=[str(capture)],
        human_eval_seed=False,
        base_model=str(MODEL_DIR),
        max_seq_len=128,
        eval_fraction=0.2,
        init_r=4,
        target_r=2,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        tinit=1,
        tfinal=1,
        batch_size=2,
        grad_accum=1,
        epochs=1,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        save_steps=3,
        save_total_limit=3,
        output_dir=str(output_dir),
        name="dev-test",
        version="v1",
        eval_batch_size=4,
        # One thread: on a shared 2-core machine two OpenMP threads that keep getting preempted wait for
        # each other at every barrier (measured: 9 s per step with 2 threads under load, 1.5 s with 1).
        num_threads=1,
    )


@dataclass
class TrainedRun:
    cfg: Any  # TrainConfig
    dataset: Any  # Dataset
    result: Any  # TrainResult
    capture: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    assert (MODEL_DIR / "config.json").is_file(), "models/base is missing: run `make model` first"
    from trainer.config import load_config
    from trainer.data import build_dataset
    from trainer.train import train

    root = tmp_path_factory.mktemp("run")
    capture = write_jsonl(root / "capture.jsonl", developer_records())
    cfg = load_config(None, tiny_overrides(capture, root / "out"))
    dataset = build_dataset(cfg, root / "out" / "dataset")
    result = train(cfg, dataset, resume=False, progress=False)
    return TrainedRun(cfg, dataset, result, capture)


@dataclass
class Exported:
    path: Path
    result: Any  # ExportResult


@pytest.fixture(scope="session")
def exported(trained: TrainedRun) -> Exported:
    from trainer.export import export_lora

    out = trained.cfg.output_path / "lora"
    return Exported(out, export_lora(trained.cfg.base_model, trained.result.adapter_dir, out))


# ---- the model server: the session's real vLLM (tests/conftest.py) ----

ModelServer = RunningVllm


@pytest.fixture(scope="session")
def adapters_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def model_server(vllm_server: RunningVllm) -> ModelServer:
    return vllm_server
