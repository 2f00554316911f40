"""The config: YAML + flags, field validation, and the AdaLoRA schedule against the data size."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trainer.config import TrainConfig, add_config_arguments, config_from_args, load_config
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p.parse_args(argv)


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("init_r: 6\ntarget_r: 3\ntarget_modules: [q_proj]\nlearning_rate: 1.0e-3\n")
    cfg = config_from_args(
        _args(["--config", str(f), "--target-r", "2", "--target-modules", "q_proj,v_proj", "--no-human-eval-seed"])
    )
    assert (cfg.init_r, cfg.target_r, cfg.target_modules) == (6, 2, ["q_proj", "v_proj"])
    assert cfg.learning_rate == 1e-3 and cfg.human_eval_seed is False
    assert cfg.batch_size == TrainConfig().batch_size


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "config/train/developer.yaml")
    assert cfg.agent == "developer" and cfg.init_r > cfg.target_r
    assert cfg.schedule(147).total_step == 30  # ceil(147 / (4 * 4)) * 3


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("init_r: 4\ntarget_r: 4\n", "init_r: must be greater than target_r"),
        ("lora_rank: 8\n", "unknown field 'lora_rank'"),
        ("batch_size: two\n", "batch_size"),
        ("- a list\n", "mapping"),
        ("precision: fp8\n", "precision"),
        ("name: ../etc\n", "name"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, yaml_text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(f)


def test_total_step_comes_from_data_size_epochs_and_accumulation() -> None:
    cfg = TrainConfig(batch_size=4, grad_accum=2, epochs=3, tinit=1, tfinal=1)
    s = cfg.schedule(n_train=33)
    assert s.total_step == 5 * 3  # ceil(33 / 8) per epoch
    assert cfg.schedule(n_train=33, world_size=2).total_step == 3 * 3  # ceil(33 / 16)
    ratio = TrainConfig(tinit_ratio=0.1, tfinal_ratio=0.2, epochs=10, batch_size=1, grad_accum=1).schedule(10)
    assert (ratio.total_step, ratio.tinit, ratio.tfinal) == (100, 10, 20)


def test_phases_that_do_not_fit_total_step_are_refused_with_the_numbers() -> None:
    cfg = TrainConfig(batch_size=4, grad_accum=4, epochs=1, tinit=2, tfinal=2)
    with pytest.raises(ConfigError) as err:
        cfg.schedule(n_train=40)  # total_step = 3
    text = str(err.value)
    assert "tinit (2) + tfinal (2)" in text and "total_step (3" in text and "40 examples" in text
