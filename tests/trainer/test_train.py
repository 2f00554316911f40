"""The training loop on the real base model: AdaLoRA really prunes, the loss really drops, and a run
stopped by a signal resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import TrainedRun, tiny_overrides
from trainer.config import load_config
from trainer.data import load_dataset
from trainer.errors import CheckpointError, TrainingInterrupted
from trainer.evaluate import evaluate
from trainer.train import train


def test_adalora_prunes_to_the_target_budget(trained: TrainedRun) -> None:
    result, cfg = trained.result, trained.cfg
    assert result.steps == result.total_step == 6
    n_modules = 30 * 2  # 30 layers x (q_proj, v_proj)
    ranks = result.rank_pattern
    assert len(ranks) == n_modules
    # update_and_allocate ran after every step: the budget went from init_r to target_r per module...
    budgets = [h["budget"] for h in result.log]
    assert budgets[0] == cfg.init_r * n_modules and budgets[-1] == cfg.target_r * n_modules
    assert budgets == sorted(budgets, reverse=True)
    # ...and the final allocation kept exactly that many triplets, unevenly (that is the point of AdaLoRA).
    assert sum(ranks.values()) == cfg.target_r * n_modules
    assert len(set(ranks.values())) > 1
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 6
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()} == ranks


def test_training_lowers_held_out_loss(trained: TrainedRun) -> None:
    report = evaluate(trained.cfg, trained.dataset, trained.result.adapter_dir)
    loss = report["held_out_loss"]
    assert loss["tokens"] > 0
    assert loss["adapter"] < loss["base"] - 0.1, loss
    assert report["pass_at_1"] is None  # no HumanEval task in this dataset


def test_resume_after_sigterm_matches_the_uninterrupted_run(trained: TrainedRun, tmp_path) -> None:
    cfg = load_config(None, tiny_overrides(trained.capture, tmp_path / "out"))
    dataset = load_dataset(trained.cfg.output_path / "dataset")

    def preempt(info) -> None:
        if info.step == 3:  # the batch job is told to stop, as Kubernetes would before evicting it
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, dataset, on_step=preempt, handle_signals=True, progress=False)
    assert stop.value.step == 3 and stop.value.checkpoint is not None
    assert not (cfg.output_path / "adalora").exists()

    resumed = train(cfg, dataset, progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == 3
    assert resumed.rank_pattern == trained.result.rank_pattern
    final = load_file(str(cfg.output_path / "checkpoints" / "step-000006" / "adapter.safetensors"))
    reference = load_file(str(trained.cfg.output_path / "checkpoints" / "step-000006" / "adapter.safetensors"))
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_of_another_configuration_is_not_resumed(trained: TrainedRun) -> None:
    other = load_config(None, {**tiny_overrides(trained.capture, trained.cfg.output_path), "learning_rate": 1e-3})
    with pytest.raises(CheckpointError, match="another configuration"):
        train(other, trained.dataset, progress=False)
