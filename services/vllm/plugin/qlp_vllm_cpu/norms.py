"""RMSNorm through vLLM's own CPU kernels when the CPU model runs eagerly (always, with LoRA enabled).

vLLM 0.32 registers its C RMSNorm as an IR op implementation for GPUs only, so on CPU the two norm ops
run their PyTorch form ("native"): pow, mean, rsqrt, casts and muls, seven ops a norm, 61 norms a token for
SmolLM2. Compiled, inductor fuses them; but vLLM runs the CPU model eagerly whenever LoRA is enabled, and
the `_C` library of the CPU build has `rms_norm` and `fused_add_rms_norm` kernels. `qlp_cpu` registers
them as an implementation of each op, and `prefer_in_eager` puts it first in the platform's priority for
eager engines (inductor keeps the native form it can fuse). Arguments the kernels do not take (a variance
over part of the row, no weight, another dtype, a strided view) fall through to native.

No `from __future__ import annotations` here: torch infers each op's schema from real annotations.
"""

from typing import Any

import torch

PROVIDER = "qlp_cpu"
OPS = ("rms_norm", "fused_add_rms_norm")


def _fits_rms(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None) -> bool:
    return variance_size is None and weight is not None and weight.dtype == x.dtype and x.is_contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None
) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def _fits_add(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> bool:
    return _fits_rms(x, weight, epsilon, variance_size) and x_residual.is_contiguous()


def fused_add_rms_norm(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)  # in place: x normed, x_residual summed
    return x, x_residual


def register_impls() -> None:
    from vllm import ir

    if PROVIDER in ir.ops.rms_norm.impls:
        return
    ir.ops.rms_norm.register_impl(PROVIDER, supports_args=_fits_rms)(rms_norm)
    ir.ops.fused_add_rms_norm.register_impl(PROVIDER, supports_args=_fits_add, inplace=True)(fused_add_rms_norm)


def prefer_in_eager(platform: Any) -> None:
    """Wrap the platform's default IR op priority: `qlp_cpu` first for the norms of an eager engine."""
    from vllm.config import CompilationMode

    default = platform.get_default_ir_op_priority

    def get_default_ir_op_priority(cls: Any, vllm_config: Any) -> Any:
        priority = default(vllm_config)
        # The CPU platform turns compilation off for LoRA later in the same config pass (cpu.py).
        if vllm_config.lora_config is not None or vllm_config.compilation_config.mode == CompilationMode.NONE:
            for op in OPS:
                setattr(priority, op, [PROVIDER, *(p for p in getattr(priority, op) if p != PROVIDER)])
        return priority

    platform.get_default_ir_op_priority = classmethod(get_default_ir_op_priority)
