"""The dataset: examples deduplicated, split by hash, formatted with the base model's chat template, masked
so that only the assistant's reply is learned, and described by a card.

    qlp train dataset --config config/train/developer.yaml --data var/capture/*.jsonl

Layout of a dataset folder (written all at once; see files.atomic_dir):
    train.jsonl, eval.jsonl   one Example per line (messages, response, source, task_id, id)
    card.json                 counts, hashes of inputs and splits, token statistics

Why tokenise prompt and reply separately: the served model sees the prompt's tokens (the server
tokenises the templated prompt alone) and then produces the reply token by token. Tokenising the whole
conversation at once could merge characters across the boundary into tokens the model never produces.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ConfigError, DataError
from .files import atomic_dir, sha256_file, sha256_json, write_json
from .records import CaptureStats, Example, human_eval_examples, read_capture

__all__ = [
    "IGNORE_INDEX",
    "Dataset",
    "Encoded",
    "build_dataset",
    "encode",
    "load_dataset",
    "load_tokenizer",
    "split_bucket",
]

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(1 for label in self.labels if label == IGNORE_INDEX)

    @property
    def target_tokens(self) -> int:
        return len(self.labels) - self.prompt_tokens


@dataclass
class Dataset:
    path: Path
    train: list[Example]
    eval: list[Example]
    card: dict[str, Any]

    @property
    def hash(self) -> str:
        return str(self.card["hash"])


def load_tokenizer(base_model: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base_model))
    except OSError as exc:
        raise ConfigError(
            f"base_model: cannot load a tokenizer from {base_model} (run `qlp prepare-model`?): {exc}"
        ) from exc
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"base_model: {base_model} has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode(tokenizer: Any, example: Example, max_seq_len: int | None = None) -> Encoded | None:
    """Chat-templated ids with labels on the assistant reply (and its end-of-turn token) only.

    None when the example is longer than `max_seq_len`: a truncated reply would teach the model to stop
    mid-answer, a truncated prompt to answer a question it did not see.
    """
    messages = example.chat()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": example.response}], tokenize=False
    )
    if not full.startswith(prompt):
        raise DataError(
            example.source, "the chat template does not render the reply after the prompt; cannot mask the prompt"
        )
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    tail = list(tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])
    # The reply ends at the end-of-turn token, which the model must learn to emit; whatever the template
    # adds after it (a newline) is never generated, so it is neither input nor target.
    eos = tokenizer.eos_token_id
    if eos in tail:
        tail = tail[: tail.index(eos) + 1]
    ids = prompt_ids + tail
    if max_seq_len is not None and len(ids) > max_seq_len:
        return None
    return Encoded(ids, [IGNORE_INDEX] * len(prompt_ids) + tail)


def split_bucket(example_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the example's content: the split never depends on file order, and an
    example stays on its side when more data arrives."""
    digest = hashlib.sha256(f"{salt}:{example_id}".encode()).hexdigest()
    return int(digest[:16], 16) / float(1 << 64)


def _token_stats(encoded: list[Encoded]) -> dict[str, Any]:
    def describe(values: list[int]) -> dict[str, Any]:
        if not values:
            return {"sum": 0, "min": 0, "max": 0, "mean": 0.0, "p50": 0, "p95": 0}
        ordered = sorted(values)
        return {
            "sum": sum(ordered),
            "min": ordered[0],
            "max": ordered[-1],
            "mean": round(statistics.fmean(ordered), 2),
            "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        }

    return {
        "examples": len(encoded),
        "total": describe([len(e.input_ids) for e in encoded]),
        "prompt": describe([e.prompt_tokens for e in encoded]),
        "assistant": describe([e.target_tokens for e in encoded]),
    }


def _collect(cfg: TrainConfig) -> tuple[list[Example], list[dict[str, Any]], dict[str, Any] | None]:
    if not cfg.data and not cfg.human_eval_seed:
        raise ConfigError("no data: give capture files (--data) or enable the HumanEval seed (--human-eval-seed)")
    examples: list[Example] = []
    sources = []
    for name in cfg.data:
        path = Path(name)
        stats = CaptureStats()
        examples.extend(read_capture(path, cfg.agent, stats))  # raises DataError on the first bad line
        sources.append(
            {
                "path": str(path),
                "sha256": sha256_file(path),
                "records": stats.records,
                "other_agent": stats.other_agent,
                "not_success": stats.not_success,
                "kept": stats.kept,
            }
        )
    seed = None
    if cfg.human_eval_seed:
        import importlib.metadata

        seed_examples = human_eval_examples()
        examples.extend(seed_examples)
        seed = {
            "package": "human-eval",
            "version": importlib.metadata.version("human-eval"),
            "tasks": len(seed_examples),
        }
    return examples, sources, seed


def build_dataset(cfg: TrainConfig, out_dir: Path, tokenizer: Any | None = None, *, replace: bool = False) -> Dataset:
    """Read, validate, deduplicate, filter, split and write the dataset folder; return it."""
    examples, sources, seed = _collect(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.base_model)
    counts = {"candidates": len(examples), "duplicates": 0, "empty_response": 0, "too_long": 0}
    seen: set[str] = set()
    kept: list[tuple[float, Example, Encoded]] = []
    for ex in examples:
        if ex.id in seen:
            counts["duplicates"] += 1
            continue
        seen.add(ex.id)
        if not ex.response.strip():
            counts["empty_response"] += 1
            continue
        enc = encode(tokenizer, ex, cfg.max_seq_len)
        if enc is None:
            counts["too_long"] += 1
            continue
        kept.append((split_bucket(ex.id, cfg.split_salt), ex, enc))
    if cfg.max_examples is not None:
        # The subset is drawn by another hash than the split's: the lowest split buckets are the eval
        # side, and a cap by those would take nearly only eval examples.
        counts["over_max_examples"] = max(0, len(kept) - cfg.max_examples)
        kept.sort(key=lambda t: split_bucket(t[1].id, cfg.split_salt + ":subset"))
        kept = kept[: cfg.max_examples]
    kept.sort(key=lambda t: t[0])
    # Lowest buckets go to eval. A small dataset still gets one eval example so that "loss before and
    # after" always has something to measure.
    n_eval = sum(1 for b, _, _ in kept if b < cfg.eval_fraction)
    if cfg.eval_fraction > 0 and n_eval == 0 and len(kept) >= 2:
        n_eval = 1
    eval_part, train_part = kept[:n_eval], kept[n_eval:]
    # Training order is shuffled by the trainer; files keep the hash order so they are reproducible.
    if not train_part:
        inputs = ", ".join(cfg.data) or "the HumanEval seed"
        raise DataError(inputs, f"no training examples left after filtering: {counts}")
    train = [ex for _, ex, _ in train_part]
    held = [ex for _, ex, _ in eval_part]
    counts.update({"train": len(train), "eval": len(held)})
    card = {
        "agent": cfg.agent,
        "hash": sha256_json(
            {"train": [e.id for e in train], "eval": [e.id for e in held], "max_seq_len": cfg.max_seq_len}
        ),
        "sources": sources,
        "human_eval_seed": seed,
        "counts": counts,
        "split": {
            "method": "sha256(salt:id) < eval_fraction",
            "eval_fraction": cfg.eval_fraction,
            "salt": cfg.split_salt,
        },
        "format": {
            "base_model": str(cfg.base_model),
            "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
            "max_seq_len": cfg.max_seq_len,
            "loss_on": "assistant reply and its end-of-turn token",
        },
        "tokens": {
            "train": _token_stats([e for _, _, e in train_part]),
            "eval": _token_stats([e for _, _, e in eval_part]),
        },
        "eval_tasks": [e.task_id for e in held if e.task_id],
    }
    with atomic_dir(out_dir, replace=replace) as tmp:
        for name, part in (("train", train), ("eval", held)):
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for ex in part:
                    f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
        write_json(tmp / "card.json", card)
    return Dataset(Path(out_dir), train, held, card)


def load_dataset(path: Path) -> Dataset:
    path = Path(path)
    card_file = path / "card.json"
    if not card_file.is_file():
        raise DataError(path, "not a dataset folder (no card.json); build one with `qlp train dataset`")
    card = json.loads(card_file.read_text())
    parts: dict[str, list[Example]] = {}
    for name in ("train", "eval"):
        file = path / f"{name}.jsonl"
        items = []
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    items.append(Example.from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(file, f"corrupt dataset line: {exc}", lineno) from exc
        parts[name] = items
    return Dataset(path, parts["train"], parts["eval"], card)
