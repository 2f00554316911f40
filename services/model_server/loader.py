"""Load the model folder (`qlp prepare-model` output) and derive what the engine needs from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .settings import Settings

__all__ = ["LoadedModel", "load_model", "resolve_device"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    max_model_len: int
    eos_token_ids: set[int]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def load_model(settings: Settings) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # noise in the fleet logs

    if not (settings.model / "config.json").is_file():
        raise FileNotFoundError(f"no model at {settings.model}; run `make model` (qlp prepare-model) first")
    device = resolve_device(settings.device)
    # float32 on CPU: bf16 matmuls are slow there without AMX, and fp32 keeps batched and solo greedy
    # decoding within rounding of each other.
    dtype = _DTYPES.get(settings.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    model: Any = AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
    model.to(device).eval()
    limit = int(model.config.max_position_embeddings)
    max_model_len = settings.max_model_len or limit
    if max_model_len > limit:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
    eos: set[int] = set()
    for source in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(int(t) for t in source)
    return LoadedModel(model, tokenizer, device, max_model_len, eos)
