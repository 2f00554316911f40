"""LoRA adapters by name, as vLLM serves them: which exist, where they came from, and the checks before loading.

Paths are trusted only inside the allowed directories (`--allowed-adapter-dir`): a path is resolved
(symlinks and `..` included) before the check, so neither a crafted relative path nor a link can reach the
rest of the disk. Only `adapter_model.safetensors` is read: a pickled `.bin` could run code on load.

The registry names adapters; the engine holds their weights under an internal id (`lora_<n>`). A reload
under the same name gets a new id, so requests still running on the old weights finish on them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import BadRequestError, NotFoundError

__all__ = [
    "ADALORA_HINT",
    "Adapter",
    "AdapterRegistry",
    "AdapterSpec",
    "WeightStore",
    "inspect_adapter",
]

ADALORA_HINT = (
    "Export it to a plain LoRA adapter with the trainer (`qlp train export`), which writes the folder vLLM "
    "and this server load."
)


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    rank: int
    base_model: str | None


@dataclass(frozen=True)
class Adapter:
    name: str
    internal_id: str
    spec: AdapterSpec
    created: int


class WeightStore(Protocol):
    """What the registry needs from the engine: put weights in, let them go when unused."""

    async def load_adapter(self, internal_id: str, path: Path) -> None: ...

    def release_adapter(self, internal_id: str) -> None: ...


def inspect_adapter(path: Path, max_rank: int) -> AdapterSpec:
    """Read and check an adapter folder without loading its weights."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise BadRequestError(
            f"No adapter_config.json in {path}: not a PEFT adapter folder.", param="lora_path"
        )
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise BadRequestError(f"Unreadable adapter_config.json in {path}.", param="lora_path") from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "ADALORA":
        raise BadRequestError(
            f"The adapter at {path} is in PEFT's AdaLoRA format, which this server (like vLLM) does not "
            f"load. {ADALORA_HINT}",
            param="lora_path",
            code="adalora_not_supported",
        )
    if peft_type != "LORA":
        raise BadRequestError(
            f"The adapter at {path} has peft_type {peft_type or 'missing'}; only LoRA is supported.",
            param="lora_path",
        )
    if not (path / "adapter_model.safetensors").is_file():
        raise BadRequestError(f"No adapter_model.safetensors in {path}.", param="lora_path")
    ranks = [int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    rank = max(ranks)
    if rank > max_rank:
        raise BadRequestError(
            f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.", param="lora_path"
        )
    base = config.get("base_model_name_or_path")
    return AdapterSpec(path=path, rank=rank, base_model=str(base) if base else None)


class AdapterRegistry:
    def __init__(
        self, store: WeightStore, allowed_dirs: list[Path], max_loras: int, max_rank: int, base_name: str
    ) -> None:
        self._store = store
        self._allowed = [d.resolve() for d in allowed_dirs]
        self._max_loras = max_loras
        self._max_rank = max_rank
        self._base_name = base_name
        self._adapters: dict[str, Adapter] = {}
        self._names: dict[str, str] = {}  # internal id -> name, kept after unload (metrics of stragglers)
        self._counter = 0
        # Loads and unloads change the set one at a time, so the max_loras check cannot race.
        self._lock = asyncio.Lock()

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def all(self) -> list[Adapter]:
        return list(self._adapters.values())

    def name_of(self, internal_id: str) -> str:
        return self._names.get(internal_id, internal_id)

    def resolve_path(self, raw: str) -> Path:
        if not raw or "\x00" in raw:
            raise BadRequestError("lora_path must be a non-empty path.", param="lora_path")
        path = Path(raw).expanduser().resolve()
        if not any(path.is_relative_to(d) for d in self._allowed):
            allowed = ", ".join(str(d) for d in self._allowed) or "(none configured)"
            raise BadRequestError(
                f"lora_path {raw!r} is outside the allowed adapter directories: {allowed}.",
                param="lora_path",
                code="adapter_path_not_allowed",
            )
        if not path.is_dir():
            raise BadRequestError(f"lora_path {raw!r} is not a directory.", param="lora_path")
        return path

    async def load(self, name: str, raw_path: str) -> Adapter:
        if not name or name == self._base_name:
            raise BadRequestError(
                "lora_name must be non-empty and differ from the base model.", param="lora_name"
            )
        async with self._lock:
            if name in self._adapters:
                raise BadRequestError(
                    f"The lora adapter '{name}' has already been loaded.", param="lora_name"
                )
            if len(self._adapters) >= self._max_loras:
                raise BadRequestError(
                    f"Already {len(self._adapters)} adapters loaded (max_loras={self._max_loras}); "
                    "unload one first.",
                    param="lora_name",
                )
            spec = inspect_adapter(self.resolve_path(raw_path), self._max_rank)
            self._counter += 1
            internal_id = f"lora_{self._counter}"
            try:
                await self._store.load_adapter(internal_id, spec.path)
            except Exception as exc:
                # Shape mismatch (another base model), unknown target modules, corrupt safetensors...
                raise BadRequestError(
                    f"Could not load the adapter at {spec.path}: {type(exc).__name__}: {str(exc)[:300]}",
                    param="lora_path",
                ) from exc
            adapter = Adapter(name=name, internal_id=internal_id, spec=spec, created=int(time.time()))
            self._adapters[name] = adapter
            self._names[internal_id] = name
            return adapter

    async def unload(self, name: str) -> None:
        async with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            # New requests no longer see the name; running ones finish before the weights go.
            self._store.release_adapter(adapter.internal_id)
