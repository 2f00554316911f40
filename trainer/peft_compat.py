"""Warnings PEFT gives for AdaLoRA that do not apply to it, silenced where we know why.

* On save, modules pruned to rank 0 hold zero-sized A/B tensors; PEFT takes those for unsharded
  DeepSpeed/FSDP parameters ("invalid shape"). For AdaLoRA they are the pruning result.
* On load, LoRA's generic `rank_pattern` matching does not understand AdaLoRA's keys (".lora_E" masks)
  and says they were "ignored"; AdaLoRA's own loader applies them (resize_modules_by_rank_pattern), which
  the export's equivalence check verifies.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["adalora_quiet"]


@contextlib.contextmanager
def adalora_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")
        warnings.filterwarnings("ignore", message=r".*rank_pattern keys did not match any targeted module.*")
        yield
