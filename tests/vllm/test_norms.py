"""The plugin's norms (services/vllm/plugin/qlp_vllm_cpu/norms.py): vLLM's CPU C kernels give what vLLM's
PyTorch form gives, and an argument they do not take falls through to it. Run in .venv-vllm, where the
kernels live; the engine-level check (the session engine logs the priority) is in test_adapter_batches."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.vllm import launch

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import torch
from vllm import ir
from vllm.platforms import current_platform
from qlp_vllm_cpu import norms
current_platform.import_kernels()
norms.register_impls()
norms.register_impls()  # a second plugin load registers nothing twice
torch.manual_seed(0)
rms, add = ir.ops.rms_norm, ir.ops.fused_add_rms_norm
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    for rows in (1, 7, 64):
        x = torch.randn(rows, 576, dtype=dtype) * 3
        r = torch.randn(rows, 576, dtype=dtype)
        w = torch.randn(576, dtype=dtype)
        want = rms.impls["native"].impl_fn(x, w, 1e-5)
        got = rms.impls["qlp_cpu"].impl_fn(x, w, 1e-5)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        want_x, want_r = add.impls["native"].impl_fn(x.clone(), r.clone(), w, 1e-5)
        x2, r2 = x.clone(), r.clone()
        got_x, got_r = add.impls["qlp_cpu"].impl_fn(x2, r2, w, 1e-5)
        assert got_x.data_ptr() == x2.data_ptr() and got_r.data_ptr() == r2.data_ptr()  # in place
        torch.testing.assert_close(got_r, want_r, atol=tol, rtol=tol)
        torch.testing.assert_close(got_x, want_x, atol=tol, rtol=tol)
x = torch.randn(8, 1152)[:, :576]  # a strided view, a partial variance, no weight: not the kernel's to take
w = torch.randn(576)
impl = rms.impls["qlp_cpu"]
assert not impl.supports_args(x, w, 1e-5)
assert not impl.supports_args(x.contiguous(), w, 1e-5, 64)
assert not impl.supports_args(x.contiguous(), None, 1e-5)
assert not impl.supports_args(x.contiguous(), w.to(torch.bfloat16), 1e-5)
assert impl.supports_args(x.contiguous(), w, 1e-5)
print("OK")
"""


def test_the_cpu_kernels_match_vllms_pytorch_norms_and_refuse_what_they_cannot_take() -> None:
    if not launch.VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed (make vllm)")
    r = subprocess.run([str(launch.VLLM_PYTHON), "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
