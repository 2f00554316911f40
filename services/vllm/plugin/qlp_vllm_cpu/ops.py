"""LoRA shrink/expand on CPU, one matmul per adapter over its rows. Pure PyTorch (no vLLM import).

`groups` is what `row_groups` returns for a batch: for each adapter slot in use, the rows that use it (a
slice when they are contiguous, as they are when the batch holds one adapter, else an index tensor). Rows
of no group (index -1, the base model) are never read or written. Weights are vLLM's stacked layout:
`[max_loras, 1, out, in]`.
"""

from __future__ import annotations

import torch

Rows = slice | torch.Tensor
Groups = list[tuple[int, Rows]]


def row_groups(indices: torch.Tensor) -> Groups:
    """The rows of each adapter slot >= 0 in `indices` (one slot index per row; -1: no adapter)."""
    spans: dict[int, list[tuple[int, int]]] = {}
    values, counts = torch.unique_consecutive(indices, return_counts=True)
    start = 0
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if value >= 0:
            spans.setdefault(value, []).append((start, start + count))
        start += count
    groups: Groups = []
    for value, runs in spans.items():
        if len(runs) == 1:
            groups.append((value, slice(*runs[0])))
        else:
            groups.append((value, torch.cat([torch.arange(a, b, device=indices.device) for a, b in runs])))
    return groups


def shrink(y: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, groups: Groups, scale: float) -> None:
    """y[rows, :r] = scale * x[rows] @ A[slot].T for each group."""
    for slot, rows in groups:
        a = weights[slot, 0].to(y.dtype)
        y[rows, : a.shape[0]] = torch.mm(x[rows].to(y.dtype), a.t()) * scale


def expand(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    groups: Groups,
    offset: int = 0,
    size: int | None = None,
    add: bool = True,
) -> None:
    """y[rows, offset:offset+size] (+)= x[rows] @ B[slot].T for each group; `size` defaults to what fits."""
    for slot, rows in groups:
        b = weights[slot, 0].to(y.dtype)
        width = size if size is not None else min(b.shape[0], y.shape[1] - offset)
        out = torch.mm(x[rows].to(y.dtype), b[:width].t())
        if add:
            y[rows, offset : offset + width] += out
        else:
            y[rows, offset : offset + width] = out


def linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stacked: tuple[torch.Tensor, ...],
    b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    groups: Groups,
) -> None:
    """A LoRA linear layer of several output slices (q, k, v or gate, up), as `shrink` into a float32 buffer
    then `expand` into each slice's columns, without the buffers: the same sums, fewer ops per step."""
    for slot, rows in groups:
        xr = x[rows].to(torch.float32)
        offset = 0
        for a, b, size in zip(a_stacked, b_stacked, output_slices, strict=True):
            h = torch.mm(xr, a[slot, 0].to(torch.float32).t()) * scale
            y[rows, offset : offset + size] += torch.mm(h.to(y.dtype), b[slot, 0, :size].to(y.dtype).t())
            offset += size
