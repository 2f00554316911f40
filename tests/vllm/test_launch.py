"""services/vllm/launch.py: every way vLLM can fail to start ends in a message that names the cause and what
to do, within a bounded time, and leaves no process behind. The failing "vLLM" is a real process (a script
standing in for the venv's python that dies the way vLLM does), except for one real vLLM given a bad model."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from services.vllm import launch
from services.vllm.launch import VllmUnavailable
from tests.conftest import MODEL_ROOT


def fake_python(tmp_path: Path, body: str) -> Path:
    """An executable that takes the place of .venv-vllm/bin/python and runs `body` (sh) instead of vLLM."""
    p = tmp_path / "python"
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def start(tmp_path: Path, python: Path, timeout: float = 30.0) -> launch.VllmProcess:
    return launch.start(
        MODEL_ROOT, launch.free_port(), tmp_path / "vllm.log", timeout=timeout, python=python, kv_cache_gib=0.5
    )


def test_not_installed_says_make_vllm(tmp_path: Path) -> None:
    with pytest.raises(VllmUnavailable, match=r"not installed .*run `make vllm`"):
        start(tmp_path, tmp_path / "no-such-venv" / "python")


def test_a_cpu_without_avx2_is_refused_before_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(launch.platform, "machine", lambda: "x86_64")
    with pytest.raises(VllmUnavailable, match=r"no AVX2.*GPU"):
        start(tmp_path, fake_python(tmp_path, "exit 0"))


def test_too_little_memory_is_refused_with_the_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_mem_available_gib", lambda: 0.6)
    with pytest.raises(VllmUnavailable, match=r"0\.6 GiB of memory available.*QLP_VLLM_KV_CACHE_GIB"):
        start(tmp_path, fake_python(tmp_path, "exit 0"))


@pytest.mark.parametrize(
    ("sig", "cause"), [(signal.SIGILL, "illegal instruction.*AVX2"), (signal.SIGKILL, "out of memory")]
)
def test_a_vllm_killed_while_loading_is_diagnosed(tmp_path: Path, sig: signal.Signals, cause: str) -> None:
    python = fake_python(tmp_path, f"echo 'Starting to load model'; kill -{sig.name[3:]} $$")
    with pytest.raises(VllmUnavailable, match=cause):
        start(tmp_path, python)


def test_a_vllm_that_never_answers_is_stopped_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    python = fake_python(tmp_path, f"echo $$ > {pid_file}; exec sleep 600")
    t0 = time.monotonic()
    with pytest.raises(VllmUnavailable, match=r"did not answer .*/health within 2s"):
        start(tmp_path, python, timeout=2)
    assert time.monotonic() - t0 < 30
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_real_vllm_with_a_bad_model_exits_with_its_log(tmp_path: Path) -> None:
    """The real vLLM, given a folder that holds no model: it exits, and the error carries the end of its log."""
    if not launch.VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed (make vllm)")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    t0 = time.monotonic()
    with pytest.raises(VllmUnavailable, match=r"vLLM exited with status \d+; log: ") as err:
        launch.start(empty, launch.free_port(), tmp_path / "vllm.log", timeout=180, kv_cache_gib=0.5)
    assert time.monotonic() - t0 < 120
    assert "not-a-model" in str(err.value)
