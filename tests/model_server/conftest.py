"""Fixtures for the model server: the real base model, real PEFT adapters made here, a real server process.

The server runs as `qlp model-server --port 0` in a subprocess; the fixture waits for its ready line (which
carries the port) and then for /health, and stops it at the end of the session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.model_server import start_model_server, stop_model_server

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "base"
BASE = "SmolLM2-135M-Instruct"
QLP = Path(sys.executable).with_name("qlp")
START_TIMEOUT_S = 120.0
# Small on purpose: context-length errors and long generations stay cheap on a 2-core CPU.
MAX_MODEL_LEN = 512


@dataclass
class Adapters:
    allowed: Path  # the server's --allowed-adapter-dir
    lora_a: Path
    lora_b: Path
    adalora: Path
    outside: Path  # a valid LoRA adapter outside the allowed directory
    escape_link: Path  # a symlink inside the allowed directory that points outside it


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen[str]
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


def _make_lora(model_dir: Path, out: Path, seed: int, targets: list[str]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    # init_lora_weights=False: random A and B, so the adapter visibly changes the output.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():  # PEFT calls a transformers API that transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(base, config).save_pretrained(out)


def _make_adalora(model_dir: Path, out: Path) -> None:
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = AdaLoraConfig(total_step=10, init_r=8, target_r=4, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(base, config).save_pretrained(out)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    assert (MODEL_DIR / "config.json").is_file(), "models/base is missing: run `make model` first"
    root = tmp_path_factory.mktemp("adapters")
    allowed, outside = root / "allowed", root / "outside"
    a = Adapters(
        allowed=allowed,
        lora_a=allowed / "lora-a",
        lora_b=allowed / "lora-b",
        adalora=allowed / "adalora",
        outside=outside / "lora-x",
        escape_link=allowed / "escape",
    )
    _make_lora(MODEL_DIR, a.lora_a, seed=0, targets=["q_proj", "v_proj", "o_proj"])
    _make_lora(MODEL_DIR, a.lora_b, seed=1, targets=["q_proj", "k_proj", "down_proj"])
    _make_adalora(MODEL_DIR, a.adalora)
    _make_lora(MODEL_DIR, a.outside, seed=2, targets=["q_proj"])
    a.escape_link.symlink_to(a.outside, target_is_directory=True)
    assert json.loads((a.adalora / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    return a


def start_server(args: list[str], log: Path) -> RunningServer:
    """Start `qlp model-server --port 0 ARGS`; return once it printed its ready line and /health is 200."""
    srv = start_model_server(args, log, timeout=START_TIMEOUT_S)
    try:
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    except BaseException:
        stop_server(srv.proc)
        raise
    return RunningServer(srv.url, srv.proc, log)


def stop_server(proc: subprocess.Popen[str]) -> None:
    stop_model_server(proc, timeout=20)


@pytest.fixture(scope="session")
def server(adapters: Adapters, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("server") / "model-server.log"
    srv = start_server(
        [
            "--allowed-adapter-dir", str(adapters.allowed),
            "--lora-modules", f"lora-a={adapters.lora_a}", f"lora-b={adapters.lora_b}",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-batch-size", "8",
            "--max-queue", "32",
        ],
        log,
    )  # fmt: skip
    yield srv
    stop_server(srv.proc)


@pytest.fixture(scope="session")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)
