"""LoRA adapters as vLLM serves them: listing, effect, mixed-adapter batches, run-time load/unload, refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from .conftest import BASE, MODEL_DIR, Adapters, RunningServer

pytestmark = pytest.mark.model

# Prompts whose greedy continuations have top-2 logit gaps far above float32 rounding (checked when these
# tests were written: smallest gap > 0.02 against ~1e-4 of batch-size rounding), so "same text alone and
# batched" tests the batching, not luck.
FRUITS = [{"role": "user", "content": "Name three fruits."}]
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy(client: openai.OpenAI, model: str, messages: list[dict[str, str]], max_tokens: int = 16) -> str:
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return out.choices[0].message.content or ""


def test_models_lists_base_and_adapters_with_parent(client: openai.OpenAI, adapters: Adapters) -> None:
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert models[BASE]["parent"] is None
    assert models["lora-a"]["parent"] == BASE and models["lora-b"]["parent"] == BASE
    assert models["lora-a"]["root"] == str(adapters.lora_a)


def test_lora_adapter_changes_output(client: openai.OpenAI) -> None:
    # The two continuations differ from their first tokens ("1. Bananas" vs "The following is").
    assert _greedy(client, "lora-a", FRUITS, max_tokens=6) != _greedy(client, BASE, FRUITS, max_tokens=6)


@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # PEFT vs transformers 5
def test_adapter_text_matches_peft_reference(
    client: openai.OpenAI, adapters: Adapters, tokenizer: Any
) -> None:
    """The server applies LoRA itself (batched, lora.py); PEFT on the same folder is the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR), str(adapters.lora_b))
    model.eval()
    prompt = tokenizer.apply_chat_template(HAIKU, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert _greedy(client, "lora-b", HAIKU) == expected


async def test_mixed_adapter_batch_gives_each_request_its_solo_text(
    client: openai.OpenAI, aclient: openai.AsyncOpenAI
) -> None:
    jobs = [(BASE, FRUITS), ("lora-a", FRUITS), ("lora-b", HAIKU), (BASE, HAIKU), ("lora-a", FRANCE)]
    solo = [_greedy(client, model, messages) for model, messages in jobs]

    async def one(model: str, messages: list[dict[str, str]]) -> str:
        out = await aclient.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=16
        )
        return out.choices[0].message.content or ""

    together = await asyncio.gather(*(one(m, msgs) for m, msgs in jobs))
    assert list(together) == solo
    assert len(set(solo[:2])) == 2  # same prompt, base vs adapter: the rows really differ


def test_load_and_unload_adapter_at_run_time(
    client: openai.OpenAI, server: RunningServer, adapters: Adapters
) -> None:
    name = "runtime-b"
    r = httpx.post(
        f"{server.v1}/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters.lora_b)}
    )
    assert r.status_code == 200, r.text
    try:
        assert name in {m.id for m in client.models.list()}
        assert _greedy(client, name, HAIKU) == _greedy(client, "lora-b", HAIKU)  # same weights, same text
        again = httpx.post(
            f"{server.v1}/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters.lora_b)}
        )
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    finally:
        r = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == 200, r.text
    assert name not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        _greedy(client, name, HAIKU, max_tokens=2)
    gone = httpx.post(f"{server.v1}/unload_lora_adapter", json={"lora_name": name})
    assert gone.status_code == 404 and set(gone.json()["error"]) == {"message", "type", "param", "code"}


def test_adalora_adapter_is_refused_naming_the_export(server: RunningServer, adapters: Adapters) -> None:
    r = httpx.post(
        f"{server.v1}/load_lora_adapter", json={"lora_name": "ada", "lora_path": str(adapters.adalora)}
    )
    assert r.status_code == 400
    error: dict[str, Any] = r.json()["error"]
    assert "AdaLoRA" in error["message"] and "qlp train export" in error["message"]
    assert error["code"] == "adalora_not_supported"


@pytest.mark.parametrize("which", ["outside", "escape_link", "dotdot"])
def test_adapter_paths_outside_allowed_dirs_are_refused(
    server: RunningServer, adapters: Adapters, which: str
) -> None:
    path = {
        "outside": str(adapters.outside),
        "escape_link": str(adapters.escape_link),  # a symlink in the allowed dir pointing out of it
        "dotdot": f"{adapters.allowed}/../outside/lora-x",
    }[which]
    r = httpx.post(f"{server.v1}/load_lora_adapter", json={"lora_name": f"x-{which}", "lora_path": path})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "adapter_path_not_allowed"
