"""vLLM 0.32.0's CPU LoRA wrapper with its row gathers replaced by `ops` (the package docstring says why).

vLLM's CPU model runner always marks batches as prefill, so the `_prefill` methods are the ones it calls;
the `_decode` ones are routed to the same code.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper import punica_cpu

from . import ops


class QlpPunicaWrapperCPU(punica_cpu.PunicaWrapperCPU):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_groups: ops.Groups = []
        self.sampler_groups: ops.Groups = []

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self.token_groups = ops.row_groups(self.token_lora_indices)
        self.sampler_groups = ops.row_groups(self.sampler_indices)

    # -- the ops the base class dispatches to, on the batch's token rows

    def _shrink_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        ops.shrink(y, x, w_t_all, self.token_groups, scale)

    def _expand_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, add_inputs: bool) -> None:
        ops.expand(y, x, w_t_all, self.token_groups, add=add_inputs)

    def _expand_slice_prefill(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool,
    ) -> None:
        ops.expand(y, x, w_t_all, self.token_groups, y_offset, y_slice_size, add=add_inputs)

    _shrink_decode = _shrink_prefill
    _expand_decode = _expand_prefill
    _expand_slice_decode = _expand_slice_prefill

    # -- whole layers: nothing to do for a batch without adapters

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.token_groups:
            y2 = y.view(-1, y.shape[-1])
            ops.linear(
                y2, x.view(-1, x.shape[-1]), lora_a_stacked, lora_b_stacked, scale, output_slices, self.token_groups
            )

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.token_groups:
            super().add_lora_embedding(y, x, *args, **kwargs)

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """The logits rows are the sampled positions, one per request: grouped by the sampler's indices."""
        if not self.sampler_groups:
            return
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if buffer is None:
            buffer = torch.zeros((x2.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x2.device)
        ops.shrink(buffer, x2, lora_a_stacked, self.sampler_groups, scale)
        ops.expand(y2, buffer, lora_b_stacked, self.sampler_groups)
