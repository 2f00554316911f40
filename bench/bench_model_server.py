"""Model server throughput: generated tokens/s at concurrency 1, 4 and 16, against plain `generate`.

    python -m bench bench_model_server
    python -c "from bench.bench_model_server import main; main(['--concurrency', '1', '16'])"

Greedy, 128 new tokens per request (`ignore_eos`, so every request generates exactly that many). The
baseline is a plain transformers `generate` loop for one request, run in this process while the server is
idle. The server runs as `qlp model-server` with three LoRA adapters loaded (made here with PEFT), and the
requests rotate over base + adapters, so batches mix adapters. Target: aggregate tokens/s at concurrency
16 at least 4x that at concurrency 1. Also printed: the server's resident size with the 3 adapters loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "base"
BASE = "SmolLM2-135M-Instruct"
ADAPTERS = ["bench-a", "bench-b", "bench-c"]
PROMPTS = [
    "Tell me a story about a dragon.",
    "Explain how a hash map works.",
    "Write a poem about autumn leaves.",
    "Describe the water cycle in detail.",
]


@dataclass
class Row:
    label: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft_p50_s: float | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def baseline(new_tokens: int) -> Row:
    """One request, plain transformers: `generate` with a KV cache, greedy, fixed length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model: Any = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    model.eval()
    text = tok.apply_chat_template(_messages(0), add_generation_prompt=True, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(**enc, **kw)
        wall = time.perf_counter() - start
    del model
    return Row("transformers generate", 1, 1, int(out.shape[1] - enc["input_ids"].shape[1]), wall)


def make_adapters(folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(base, config)
        with torch.no_grad():  # non-zero B, so the adapters really compute something
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.01)
        model.save_pretrained(folder / name)


def start_server(adapter_dir: Path, max_batch_size: int) -> tuple[subprocess.Popen[str], str]:
    lora = [f"{n}={adapter_dir / n}" for n in ADAPTERS]
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("qlp")), "model-server", "--port", "0", "--model", str(MODEL_DIR),
         "--allowed-adapter-dir", str(adapter_dir), "--lora-modules", *lora,
         "--max-batch-size", str(max_batch_size), "--max-queue", "256"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    while True:
        line = lines.get(timeout=180)
        if not line:
            raise RuntimeError("model server exited before it was ready")
        if line.startswith("model-server ready on "):
            return proc, line.split(" on ", 1)[1].strip()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, concurrency: int, new_tokens: int) -> Row:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    models = [BASE, *ADAPTERS]
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model=models[i % len(models)], messages=_messages(i), temperature=0, max_tokens=new_tokens,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        first = True
        async for chunk in stream:
            if first and chunk.choices and chunk.choices[0].delta.content:
                ttfts.append(time.perf_counter() - start)
                first = False
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttfts.sort()
    return Row(
        "model server", concurrency, concurrency, tokens, wall, ttfts[len(ttfts) // 2] if ttfts else None
    )


def _print(rows: list[Row], base_c1: float | None, rss: float, rss_after: float) -> None:
    print(
        f"{'mode':<22} {'conc':>4} {'reqs':>4} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'x c=1':>6} {'TTFT p50':>8}"
    )
    for r in rows:
        ratio = f"{r.tok_s / base_c1:.1f}" if base_c1 and r.label == "model server" else ""
        ttft = f"{r.ttft_p50_s:.2f}s" if r.ttft_p50_s is not None else ""
        print(
            f"{r.label:<22} {r.concurrency:>4} {r.requests:>4} {r.tokens:>6} {r.wall_s:>7.1f} "
            f"{r.tok_s:>7.1f} {ratio:>6} {ttft:>8}"
        )
    print(
        f"model server RSS with {len(ADAPTERS)} adapters loaded: {rss:.0f} MiB idle, {rss_after:.0f} MiB after the runs"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_model_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if not (MODEL_DIR / "config.json").is_file():
        print("bench_model_server: models/base is missing; run `make model`", file=sys.stderr)
        return 1
    # The server sets this before torch loads (see services/model_server/cli.py); the baseline gets the same.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = [baseline(args.new_tokens)]
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        make_adapters(Path(tmp))
        proc, url = start_server(Path(tmp), max_batch_size=max(args.concurrency))
        try:
            asyncio.run(load(url, 1, 8))  # warm-up
            rss = rss_mib(proc.pid)
            for c in args.concurrency:
                rows.append(asyncio.run(load(url, c, args.new_tokens)))
            rss_after = rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    c1 = next((r.tok_s for r in rows if r.label == "model server" and r.concurrency == 1), None)
    _print(rows, c1, rss, rss_after)
    c16 = next((r.tok_s for r in rows if r.label == "model server" and r.concurrency == 16), None)
    if c1 and c16:
        verdict = "meets" if c16 >= 4 * c1 else "MISSES"
        print(f"concurrency 16 / concurrency 1 = {c16 / c1:.1f}x ({verdict} the 4x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
