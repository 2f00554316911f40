"""The running batch: one left-padded KV cache shared by every sequence being decoded.

Layout (per layer, keys and values): [rows, kv_heads, columns, head_dim]. A row's real tokens are the last
`length` columns; the columns before them are padding, masked out by `mask` (rows x columns, 1 = real).
A row's RoPE position is its own token count, passed as `position_ids`, so padding changes neither the
positions nor (being masked) the attention of a row: its logits are those of the same sequence run alone.

Sequences join between decode steps: their prefill cache (computed alone, unpadded) is left-padded to the
batch's width, or the batch to theirs, and concatenated on the row axis. Finished rows are dropped with an
index select, and columns that became padding in every remaining row are trimmed so the cache does not
keep the width of a long sequence that has left.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F

__all__ = ["DecodeBatch"]

RowT = TypeVar("RowT")


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    # Pads dim -2 (the column axis of a [rows, heads, columns, dim] cache tensor).
    return t if n == 0 else F.pad(t, (0, 0, n, 0))


class DecodeBatch(Generic[RowT]):
    def __init__(self) -> None:
        self.cache: Any = None  # transformers DynamicCache
        self.rows: list[RowT] = []
        self.adapters: list[str | None] = []  # the engine's adapter id per row, None = base
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.last_tokens = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def cells(self) -> int:
        """KV slots held (rows x columns, padding included): what the cache costs in memory."""
        return len(self.rows) * self.width

    def add(
        self, rows: list[RowT], adapter: str | None, cache: Any, length: int, last_tokens: list[int]
    ) -> None:
        """Join `rows` that share one prefilled prompt of `length` tokens (its cache has len(rows) rows)."""
        n = len(rows)
        mask = torch.ones(n, length, dtype=torch.long)
        positions = torch.full((n,), length, dtype=torch.long)
        if not self.rows:
            self.cache, self.mask, self.positions = cache, mask, positions
        else:
            width = max(self.width, length)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat(
                    [_pad_left(mine.keys, width - self.width), _pad_left(theirs.keys, width - length)]
                )
                mine.values = torch.cat(
                    [_pad_left(mine.values, width - self.width), _pad_left(theirs.values, width - length)]
                )
            self.mask = torch.cat(
                [F.pad(self.mask, (width - self.width, 0)), F.pad(mask, (width - length, 0))]
            )
            self.positions = torch.cat([self.positions, positions])
        self.rows.extend(rows)
        self.adapters.extend([adapter] * n)
        self.last_tokens = torch.cat([self.last_tokens, torch.tensor(last_tokens, dtype=torch.long)])

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), then trim columns that are padding in all of them."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.__init__()  # type: ignore[misc]
            return
        idx = torch.tensor(indices, dtype=torch.long)
        mask = self.mask[idx]
        # First column that is real in some row; everything before it is padding everywhere.
        first = int(mask.any(dim=0).long().argmax())
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, first:].contiguous()
            layer.values = layer.values[idx, :, first:].contiguous()
        self.mask = mask[:, first:].contiguous()
        self.positions = self.positions[idx]
        self.last_tokens = self.last_tokens[idx]
        self.rows = [self.rows[i] for i in indices]
        self.adapters = [self.adapters[i] for i in indices]

    def step_inputs(self) -> dict[str, Any]:
        """Model inputs for one decode step: each row feeds its last token at its own position."""
        rows = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        return {
            "input_ids": self.last_tokens.view(rows, 1),
            "attention_mask": self.mask,
            "position_ids": self.positions.view(rows, 1),
            "cache": self.cache,
        }

    def advance(self, new_tokens: list[int]) -> None:
        self.positions = self.positions + 1
        self.last_tokens = torch.tensor(new_tokens, dtype=torch.long)
