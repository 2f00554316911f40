"""Requests batched together in real vLLM get exactly their own adapter, and base-model requests none.

vLLM 0.32's CPU LoRA ops read the last adapter slot for rows without an adapter, so once `max-loras`
adapters had been used, a base-model request batched beside an adapter request came back with the last
slot's adapter applied (upstream: vllm-project/vllm PRs 48421, 49656). The project's plugin
(services/vllm/plugin) fixes it; this runs the failing case against the session's engine: every slot
filled, then each adapter batched with the base model and with another adapter."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.conftest import MODEL_ROOT, RunningVllm

pytestmark = pytest.mark.model

BASE = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
MAX_LORAS = int(yaml.safe_load((MODEL_ROOT.parents[1] / "services/vllm/cpu.yaml").read_text())["max-loras"])


def random_adapter(path: Path, seed: int) -> None:
    """A LoRA with large random weights on every projection: its greedy answer is nothing like the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(MODEL_ROOT, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    peft.save_pretrained(path)


@pytest.fixture(scope="module")
def adapters(vllm_server: RunningVllm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    root = tmp_path_factory.mktemp("random-adapters")
    names = [f"batch-probe-{i}" for i in range(MAX_LORAS)]
    with httpx.Client(base_url=vllm_server.url, timeout=60) as c:
        for i, name in enumerate(names):
            random_adapter(root / name, seed=1000 + i)
            r = c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(root / name)})
            assert r.status_code == 200, r.text
        yield names
        for name in names:
            c.post("/v1/unload_lora_adapter", json={"lora_name": name})


def answer(url: str, model: str) -> str:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": ASK, "max_tokens": 16, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def together(url: str, *models: str) -> list[str]:
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda m: answer(url, m), models))


def test_batched_requests_get_their_own_adapter_and_the_base_model_none(
    vllm_server: RunningVllm, adapters: list[str]
) -> None:
    log = vllm_server.log.read_text(errors="replace")
    assert "Using QlpPunicaWrapperCPU" in log, "plugin not loaded: make vllm"
    assert "rms_norm=['qlp_cpu', 'native'], fused_add_rms_norm=['qlp_cpu', 'native']" in log  # norms.py
    url = vllm_server.url
    alone = {m: answer(url, m) for m in [BASE, *adapters]}  # one at a time: this also fills every slot
    assert len(set(alone.values())) == len(alone), alone  # the probes are told apart by their answers

    for name in adapters:
        assert together(url, BASE, name) == [alone[BASE], alone[name]], name
    first, last = adapters[0], adapters[-1]
    assert together(url, BASE, first, last) == [alone[BASE], alone[first], alone[last]]
