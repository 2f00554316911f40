"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    <output_dir>/checkpoints/step-000040/
        adapter.safetensors   every AdaLoRA tensor at full rank (A, E, B), pruned rows included
        state.pt              optimizer, LR scheduler, RNG states, the rank allocator's importance EMAs,
                              the current rank pattern
        meta.json             step, run and dataset hashes (written last; its presence marks completeness)

Why not PEFT's `save_pretrained`: it cuts A/E/B down to the kept ranks, so loading it for training would
shrink the modules, break the optimizer state's shapes and restart the budget from the smaller rank.
The PEFT-format adapter is written once, at the end (`<output_dir>/adalora/`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import atomic_dir, write_json

__all__ = ["CheckpointMeta", "latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CheckpointMeta:
    path: Path
    step: int
    resume_hash: str
    dataset_hash: str


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(root: Path) -> list[CheckpointMeta]:
    out = []
    for d in sorted((root / "checkpoints").glob("step-*")):
        meta = d / META_FILE
        if not meta.is_file():
            continue  # unfinished write of a run that died; atomic_dir normally removes these
        m = json.loads(meta.read_text())
        out.append(CheckpointMeta(d, int(m["step"]), m["resume_hash"], m["dataset_hash"]))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> CheckpointMeta | None:
    found = _checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    state: dict[str, Any],
    resume_hash: str,
    dataset_hash: str,
    keep: int,
) -> Path:
    from safetensors.torch import save_file

    dest = root / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(dest, replace=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / ADAPTER_FILE))
        torch.save(state, tmp / STATE_FILE)
        write_json(
            tmp / META_FILE,
            {
                "step": step,
                "resume_hash": resume_hash,
                "dataset_hash": dataset_hash,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return dest


def load_checkpoint(
    meta: CheckpointMeta, resume_hash: str, dataset_hash: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors and trainer state of a checkpoint, after checking it belongs to this run."""
    from safetensors.torch import load_file

    if meta.resume_hash != resume_hash:
        raise CheckpointError(
            f"{meta.path} was written by a run with another configuration; resuming it would mix two runs. "
            "Use --fresh to start over, or another --output-dir."
        )
    if meta.dataset_hash != dataset_hash:
        raise CheckpointError(
            f"{meta.path} was trained on another dataset (the inputs changed since). "
            "Use --fresh to start over, or another --output-dir."
        )
    try:
        adapter = load_file(str(meta.path / ADAPTER_FILE))
        state = torch.load(meta.path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{meta.path}: unreadable checkpoint: {exc}") from exc
    return adapter, state
