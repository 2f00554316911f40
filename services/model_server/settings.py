"""Settings of one model server process (built by `cli.py` from vLLM-style flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LoraModule", "Settings"]


@dataclass(frozen=True)
class LoraModule:
    """An adapter to load at start, as vLLM's `--lora-modules name=path`."""

    name: str
    path: Path


@dataclass
class Settings:
    model: Path = Path("models/base")
    served_model_name: str = "SmolLM2-135M-Instruct"
    host: str = "127.0.0.1"
    port: int = 8100
    lora_modules: list[LoraModule] = field(default_factory=list)
    # Adapters loaded at once (start-up and run-time together); vLLM's max_loras bounds one batch instead.
    max_loras: int = 8
    max_lora_rank: int = 64
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    allowed_adapter_dirs: list[Path] = field(default_factory=lambda: [Path("models/adapters")])
    # Sequences decoded together in one step (a request with n choices takes n of them).
    max_batch_size: int = 16
    # Sequences that may wait for a batch slot (beyond max_batch_size); past it, 503 with Retry-After.
    max_queue: int = 64
    max_n: int = 8
    device: str = "auto"
    dtype: str = "auto"
    # 0: torch's default (one per physical core).
    num_threads: int = 0
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("--max-batch-size must be at least 1")
        if self.max_queue < 0:
            raise ValueError("--max-queue must be >= 0")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("--max-loras must be >= 0 and --max-lora-rank >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len must be at least 2")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ValueError("--device must be auto, cpu or cuda")
        if self.dtype not in {"auto", "float32", "bfloat16", "float16"}:
            raise ValueError("--dtype must be auto, float32, bfloat16 or float16")
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names) or self.served_model_name in names:
            raise ValueError("--lora-modules names must be unique and differ from --served-model-name")
