"""vLLM's CPU LoRA path with the project's plugin (services/vllm/plugin) against vLLM 0.32's own, side by side:
generated tokens/s of the base model and of an adapter at one stream and at 8, and a batch mixing both
(that base-model rows stay the base model's in such a batch is tests/vllm/test_adapter_batches.py's job).

    python -m bench bench_vllm_lora                          (part of `make bench`)
    QLP_BENCH_ROUNDS=1 QLP_BENCH_NEW_TOKENS=64 python -m bench bench_vllm_lora

One float32 engine at a time, as `qlp up` starts it (`services/vllm/launch.py`, `cpu.yaml`); "vLLM's own" is
the same engine with the plugin left out (`VLLM_PLUGINS` naming only vLLM's bundled ones). The adapter: a
LoRA of rank 12 (the trainer's AdaLoRA `init_r`) on every projection, random weights (speed does not depend
on what it learned). Each round starts both engines, in alternating order; medians of QLP_BENCH_ROUNDS (2).
Streams: greedy, exactly QLP_BENCH_NEW_TOKENS (128) new tokens. Mixed: 4 base and 4 adapter streams at once.
Results: bench/results/bench_vllm_lora.{json,md}.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.bench_vllm import MODEL_DIR, load
from bench.harness import machine_note, median, write_results

ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
BASE = "SmolLM2-135M-Instruct"
ADAPTER = "bench-lora"
WITHOUT_PLUGIN = {"VLLM_PLUGINS": "lora_filesystem_resolver,lora_hf_hub_resolver"}  # vLLM's bundled ones
EXTRA = {"ignore_eos": True}


def make_adapter(path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(
        model, LoraConfig(r=12, lora_alpha=24, target_modules=targets, init_lora_weights=False)
    ).save_pretrained(path)


@contextlib.contextmanager
def engine(plugin: bool, adapter: Path) -> Iterator[str]:
    from services.vllm import launch

    log = Path(tempfile.mkdtemp(prefix="qlp-vllm-lora-")) / "vllm.log"
    v = launch.start(
        MODEL_DIR, launch.free_port(), log, timeout=300, dtype="float32", env=None if plugin else WITHOUT_PLUGIN
    )
    try:
        wrapper = "QlpPunicaWrapperCPU" if plugin else "Using PunicaWrapperCPU"
        assert wrapper in log.read_text(errors="replace"), f"expected {wrapper} in {log}"
        r = httpx.post(
            f"{v.url}/v1/load_lora_adapter", json={"lora_name": ADAPTER, "lora_path": str(adapter)}, timeout=60
        )
        r.raise_for_status()
        yield v.url
    finally:
        launch.stop(v.proc)


async def mixed(url: str) -> float:
    start = time.perf_counter()
    runs = await asyncio.gather(load(url, BASE, 4, EXTRA), load(url, ADAPTER, 4, EXTRA))
    return sum(r["tokens"] for r in runs) / (time.perf_counter() - start)


def one_round(url: str) -> dict[str, float]:
    asyncio.run(load(url, BASE, 1, EXTRA))  # warm-up
    return {
        "base c=1": asyncio.run(load(url, BASE, 1, EXTRA))["tok_s"],
        "adapter c=1": asyncio.run(load(url, ADAPTER, 1, EXTRA))["tok_s"],
        "base c=8": asyncio.run(load(url, BASE, 8, EXTRA))["tok_s"],
        "adapter c=8": asyncio.run(load(url, ADAPTER, 8, EXTRA))["tok_s"],
        "mixed 4+4": asyncio.run(mixed(url)),
    }


def main(argv: list[str]) -> int:
    note = machine_note()
    adapter = Path(tempfile.mkdtemp(prefix="qlp-bench-lora-")) / ADAPTER
    make_adapter(adapter)
    runs: dict[str, list[dict[str, float]]] = {"plugin": [], "vllm": []}
    for i in range(ROUNDS):
        for name in ["plugin", "vllm"] if i % 2 == 0 else ["vllm", "plugin"]:
            with engine(name == "plugin", adapter) as url:
                runs[name].append(one_round(url))
                print(name, {k: round(v, 1) for k, v in runs[name][-1].items()}, flush=True)
    keys = list(runs["plugin"][0])
    res = {name: {k: median([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    lines = [
        "# vLLM CPU LoRA: the project's plugin against vLLM 0.32's own (float32, tokens/s)",
        "",
        note,
        "",
        f"`python -m bench bench_vllm_lora`, {ROUNDS} round(s), medians; adapter of rank 12 on every projection.",
        "",
        "| load | vLLM's own | plugin | plugin / own |",
        "|---|---|---|---|",
    ]
    for k in keys:
        lines.append(
            f"| {k} | {res['vllm'][k]:.1f} | {res['plugin'][k]:.1f} | {res['plugin'][k] / res['vllm'][k]:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    write_results("bench_vllm_lora", {"note": note, "rounds": ROUNDS, "runs": runs, "medians": res}, table)
    return 0
