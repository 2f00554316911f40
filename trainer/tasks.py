"""Task families with a verifiable success criterion: what "the adapter does the job" means, checked.

    from trainer.tasks import TASKS
    family = TASKS["signature-json"]
    tasks = family.tasks()                       # deterministic, from real sources
    family.check(tasks[0].messages, reply)       # True / False, from the request alone

A family knows how to ask (`prompt`), how to answer correctly (`reference`: what the T3 teacher stands in
with in the learning-loop proof) and how to grade a reply from the request alone (`check`), so the same
check grades captured traffic, the trainer's held-out split and the orchestrator's A/B tasks.

`signature-json`: "describe this Python function's signature as JSON". The functions are every public
module-level `def` of the running interpreter's standard library (real code, no download; the set is a
function of the Python minor version, recorded as `source`). The reply must be exactly one JSON object
`{"name", "params", "required"}` equal to what `ast` says: a T0-sized chore (structured extraction from
code, the kind an orchestrator hands a cheap model before calling a tool) that a 135M model can learn and
that is graded without judgement.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .data import split_bucket

__all__ = ["TASKS", "Family", "Task", "signature_answer", "signature_expected", "split_of"]


@dataclass(frozen=True)
class Task:
    task_id: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    reference: str  # the correct reply

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class Family:
    name: str
    source: str
    tasks: Callable[[], list[Task]]
    check: Callable[[Sequence[Any], str], bool]  # (messages as dicts or (role, content) pairs, reply) -> success


def split_of(task_id: str, salt: str, bounds: Sequence[tuple[str, float]]) -> str:
    """The named slice a task falls in, by hash of salt:task_id: `bounds` = [(name, upper bound in [0, 1])]
    in increasing order. Content-only, so adding tasks never moves one across."""
    x = split_bucket(task_id, salt)  # the trainer's own train/eval split hash
    for name, upper in bounds:
        if x < upper:
            return name
    return bounds[-1][0]


# ---- signature-json ------------------------------------------------------------------------------------

SIGNATURE_INSTRUCTION = (
    'Describe the signature of this Python function as JSON with the keys "name" (the function\'s name), '
    '"params" (every parameter in order, *args written with * and **kwargs with **) and "required" (the '
    "parameters a caller must pass: no default, not starred). Reply with the JSON object only.\n\n"
    "```python\n{code}\n```"
)
_CODE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)
_MAX_HEADER_LINES, _MAX_HEADER_CHARS = 6, 320
# Packages of the standard library that are tests, demos or GUI: not what an agent is asked about.
_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "__pycache__",
    "pydoc_data",
    "venv",
}


def signature_answer(code: str) -> dict[str, Any] | None:
    """What `ast` says about the first function in `code`; None when there is none."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)), None)
    if fn is None:
        return None
    a = fn.args
    positional = [p.arg for p in a.posonlyargs + a.args]
    with_default = set(positional[len(positional) - len(a.defaults) :]) if a.defaults else set()
    params = (
        positional
        + ([f"*{a.vararg.arg}"] if a.vararg else [])
        + [p.arg for p in a.kwonlyargs]
        + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
    )
    required = [p for p in positional if p not in with_default] + [
        p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is None
    ]
    return {"name": fn.name, "params": params, "required": required}


def _header(lines: list[str], fn: ast.FunctionDef) -> str | None:
    """The `def ...:` lines of a function as written (decorators and body left out), body as `...`."""
    first = fn.lineno - 1
    body_start = fn.body[0].lineno - 1
    if body_start <= first:  # `def f(x): return x` on one line
        return None
    text = textwrap.dedent("\n".join(lines[first:body_start])).rstrip()
    if not text.endswith(":") or len(text) > _MAX_HEADER_CHARS or text.count("\n") >= _MAX_HEADER_LINES:
        return None
    return f"{text}\n    ..."


def _stdlib_modules() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP or part.startswith(("_", ".")) for part in rel.parts):
            continue
        out.append((".".join(rel.with_suffix("").parts).removesuffix(".__init__"), path))
    return out


@cache
def _signature_tasks() -> tuple[Task, ...]:
    tasks: dict[str, Task] = {}
    for module, path in _stdlib_modules():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
                continue
            code = _header(lines, fn)
            answer = signature_answer(code) if code else None
            if code is None or answer is None or len(answer["params"]) > 8:
                continue
            task_id = f"{module}.{fn.name}"
            if task_id in tasks:  # redefined under a platform branch: keep the first
                continue
            prompt = SIGNATURE_INSTRUCTION.format(code=code)
            tasks[task_id] = Task(task_id, (("user", prompt),), json.dumps(answer))
    return tuple(tasks.values())


def _reply_json(reply: str) -> Any:
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    return json.loads(text)


def _last_user(messages: Sequence[Any]) -> str:
    for m in reversed(messages):
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        if role == "user":
            return str(content)
    return ""


def signature_expected(messages: Sequence[Any]) -> dict[str, Any] | None:
    """The right answer to a signature-json request: `ast`'s reading of the function in its code block."""
    m = _CODE.search(_last_user(messages))
    return signature_answer(m.group(1)) if m else None


def check_signature(messages: Sequence[Any], reply: str) -> bool:
    """Success: the reply is one JSON object equal to `ast`'s reading of the function in the request."""
    expected = signature_expected(messages)
    if expected is None:
        return False
    try:
        return bool(_reply_json(reply) == expected)
    except ValueError:
        return False


TASKS: dict[str, Family] = {
    "signature-json": Family(
        "signature-json",
        f"Python {sys.version_info.major}.{sys.version_info.minor} standard library",
        lambda: list(_signature_tasks()),
        check_signature,
    ),
}
