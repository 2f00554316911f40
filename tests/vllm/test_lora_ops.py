"""The project's vLLM plugin (services/vllm/plugin) computes LoRA on CPU one adapter at a time: each row gets
exactly its own adapter's delta, and rows without an adapter (index -1) are never touched, even when the last
adapter slot holds weights (vLLM 0.32's own CPU ops read slot -1 for them). Pure PyTorch, no vLLM needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services" / "vllm" / "plugin"))
from qlp_vllm_cpu import ops

MAX_LORAS, RANK, D_IN, D_OUT = 4, 8, 12, 10


def weights(out: int, inp: int) -> torch.Tensor:
    torch.manual_seed(out * 100 + inp)
    return torch.randn(MAX_LORAS, 1, out, inp)  # every slot, the last included, holds an adapter


def test_rows_are_grouped_by_adapter_and_base_rows_belong_to_no_group() -> None:
    groups = ops.row_groups(torch.tensor([-1, 0, 0, 3, -1, 3, 3]))
    as_lists = {slot: (rows if isinstance(rows, slice) else rows.tolist()) for slot, rows in groups}
    assert as_lists == {0: slice(1, 3), 3: [3, 5, 6]}
    assert ops.row_groups(torch.tensor([-1, -1])) == []
    assert ops.row_groups(torch.tensor([], dtype=torch.long)) == []


@pytest.mark.parametrize("indices", [[2, 2, 2], [-1, 3, -1, 0, 3], [-1, -1, -1], [3]])
def test_each_row_gets_its_own_adapter_and_base_rows_are_left_alone(indices: list[int]) -> None:
    idx = torch.tensor(indices)
    groups = ops.row_groups(idx)
    x = torch.randn(len(indices), D_IN)
    a, b = weights(RANK, D_IN), weights(D_OUT, RANK)

    buffer = torch.zeros(len(indices), RANK)
    ops.shrink(buffer, x, a, groups, scale=0.5)
    y = torch.randn(len(indices), D_OUT + 2)  # wider than B's output, as vLLM's padded logits are
    before = y.clone()
    ops.expand(y, buffer, b, groups)

    for row, slot in enumerate(indices):
        if slot < 0:
            assert torch.equal(y[row], before[row])
            continue
        delta = (x[row] @ a[slot, 0].T * 0.5) @ b[slot, 0].T
        torch.testing.assert_close(y[row, :D_OUT], before[row, :D_OUT] + delta)
        assert torch.equal(y[row, D_OUT:], before[row, D_OUT:])


def test_an_expand_slice_writes_only_its_columns_and_can_overwrite() -> None:
    idx = torch.tensor([1, -1])
    groups = ops.row_groups(idx)
    x, b = torch.randn(2, RANK), weights(4, RANK)
    y = torch.zeros(2, 10)
    ops.expand(y, x, b, groups, offset=3, size=4, add=False)
    torch.testing.assert_close(y[0, 3:7], x[0] @ b[1, 0].T)
    assert not y[0, :3].any() and not y[0, 7:].any() and not y[1].any()


@pytest.mark.parametrize("indices", [[1, 1], [-1, 3, 0, 3]])
def test_a_layer_of_several_slices_equals_shrink_then_expand_per_slice(indices: list[int]) -> None:
    groups = ops.row_groups(torch.tensor(indices))
    slices = (6, 3, 3)  # q, k, v
    a = tuple(weights(RANK, D_IN) + i for i in range(3))
    b = tuple(weights(n, RANK) - i for i, n in enumerate(slices))
    x = torch.randn(len(indices), D_IN)
    y = torch.randn(len(indices), sum(slices))
    expected = y.clone()
    offset = 0
    for ai, bi, n in zip(a, b, slices, strict=True):
        buffer = torch.zeros(len(indices), RANK)
        ops.shrink(buffer, x, ai, groups, scale=2.0)
        ops.expand(expected, buffer, bi, groups, offset, n)
        offset += n
    ops.linear(y, x, a, b, 2.0, slices, groups)
    torch.testing.assert_close(y, expected)
