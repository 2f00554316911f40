"""Evaluation: the base model and the adapter side by side, on the held-out split.

    qlp train eval --adapter var/train/developer/adalora --dataset var/train/developer/dataset

  * held-out loss: mean negative log-likelihood per assistant token (the same masking as training, no
    regulariser), base model and adapter;
  * pass@1 for code tasks (HumanEval tasks that fell in the eval split): one greedy completion per task,
    its tests run in the sandbox (trainer/sandbox.py); pass@1 = passed / tasks.

The base model is the same weights with the adapter switched off (`disable_adapter`), so both columns
come from one load and one tokenizer.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from gateway.report.compute import wilson

from .data import IGNORE_INDEX, Dataset, load_tokenizer
from .peft_compat import adalora_quiet
from .records import Example, human_eval_problems
from .sandbox import Limits, detect_isolation, run_program
from .tasks import TASKS
from .train import collate, encode_split

__all__ = [
    "evaluate",
    "extract_code",
    "format_report",
    "generate",
    "held_out_loss",
    "humaneval_program",
    "load_adapter_model",
]

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def load_adapter_model(base_model: str | Path, adapter_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """Base + adapter (AdaLoRA checkpoint or exported LoRA: PEFT reads either)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype).to(device)  # type: ignore[arg-type]
    with adalora_quiet():
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


@torch.inference_mode()
def held_out_loss(
    model: Any, tokenizer: Any, examples: list[Example], max_seq_len: int, batch_size: int, device: torch.device
) -> tuple[float, int]:
    """(mean NLL per assistant token, number of those tokens). Computed from logits: AdaLoRA's forward
    adds its orthogonality penalty to `loss` when labels are passed, which is not a property of the data."""
    encoded = encode_split(tokenizer, examples, max_seq_len)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i : i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(nll)
        count += int((shift_labels != IGNORE_INDEX).sum())
    return (total / count if count else math.nan), count


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy replies, batched with left padding (so every row's prompt ends where generation starts)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out: list[str] = []
    for i in range(0, len(conversations), batch_size):
        prompts = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations[i : i + batch_size]
        ]
        ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        result = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen)
        for row in result[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def extract_code(reply: str) -> str:
    """The first fenced code block of a reply (an unterminated one counts), else the whole reply."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def humaneval_program(problem: dict[str, Any], reply: str) -> str:
    """The program that checks a reply: the task's prompt (imports, signature, docstring), then the reply's
    code (a whole function redefines the stub; a bare body completes it), then the tests."""
    code = extract_code(reply)
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        body = problem["prompt"] + "\n    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _pass_at_1(
    model: Any,
    tokenizer: Any,
    tasks: list[Example],
    problems: dict[str, dict[str, Any]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    limits: Limits,
) -> list[dict[str, Any]]:
    replies = generate(model, tokenizer, [t.chat() for t in tasks], max_new_tokens, batch_size, device)
    results = []
    for task, reply in zip(tasks, replies, strict=True):
        r = run_program(humaneval_program(problems[task.task_id or ""], reply), limits)
        results.append({"task_id": task.task_id, "status": r.status, "detail": r.detail})
    return results


def evaluate(
    cfg: Any,
    dataset: Dataset,
    adapter_dir: Path,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: Any | None = None,
) -> dict[str, Any]:
    """The side-by-side report (a JSON-able dict)."""
    from .train import resolve_device

    if device is None or dtype is None:
        device, dtype = resolve_device(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.base_model)
    model = load_adapter_model(cfg.base_model, Path(adapter_dir), device, dtype)
    report: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "dataset_hash": dataset.hash,
        "eval_examples": len(dataset.eval),
    }
    with model.disable_adapter():
        base_loss, n_tokens = held_out_loss(
            model, tokenizer, dataset.eval, cfg.max_seq_len, cfg.eval_batch_size, device
        )
    adapter_loss, _ = held_out_loss(model, tokenizer, dataset.eval, cfg.max_seq_len, cfg.eval_batch_size, device)
    report["held_out_loss"] = {"tokens": n_tokens, "base": round(base_loss, 5), "adapter": round(adapter_loss, 5)}

    tasks = [e for e in dataset.eval if e.task_id]
    if cfg.eval_max_tasks is not None:
        tasks = tasks[: cfg.eval_max_tasks]
    if cfg.pass_at_1 and tasks:
        problems = human_eval_problems()
        limits = Limits(timeout_s=cfg.sandbox_timeout, memory_mb=cfg.sandbox_memory_mb)
        args = (tokenizer, tasks, problems, cfg.max_new_tokens, cfg.eval_batch_size, device, limits)
        with model.disable_adapter():
            base_results = _pass_at_1(model, *args)
        adapter_results = _pass_at_1(model, *args)
        report["pass_at_1"] = {
            "tasks": len(tasks),
            "base": sum(r["status"] == "passed" for r in base_results) / len(tasks),
            "adapter": sum(r["status"] == "passed" for r in adapter_results) / len(tasks),
            "max_new_tokens": cfg.max_new_tokens,
            "sandbox": detect_isolation().describe(),
            "per_task": [
                {
                    "task_id": b["task_id"],
                    "base": b["status"],
                    "adapter": a["status"],
                    "base_detail": b["detail"],
                    "adapter_detail": a["detail"],
                }
                for b, a in zip(base_results, adapter_results, strict=True)
            ],
        }
    else:
        report["pass_at_1"] = None
    report["task_success"] = _task_success(cfg, model, tokenizer, dataset.eval, device)
    return report


def _task_success(
    cfg: Any, model: Any, tokenizer: Any, examples: list[Example], device: torch.device
) -> dict[str, Any] | None:
    """Greedy replies of base and adapter to the eval split, graded by the task family's check (each
    example's own request: no lookup). None without `success_check`."""
    if not cfg.success_check or not examples:
        return None
    family = TASKS[cfg.success_check]
    tasks = examples[: cfg.eval_max_tasks] if cfg.eval_max_tasks is not None else examples
    chats = [t.chat() for t in tasks]
    with model.disable_adapter():
        base = generate(model, tokenizer, chats, cfg.max_new_tokens, cfg.eval_batch_size, device)
    adapter = generate(model, tokenizer, chats, cfg.max_new_tokens, cfg.eval_batch_size, device)
    ok_base = [family.check(c, r) for c, r in zip(chats, base, strict=True)]
    ok_adapter = [family.check(c, r) for c, r in zip(chats, adapter, strict=True)]
    n = len(tasks)
    return {
        "check": family.name,
        "tasks": n,
        "max_new_tokens": cfg.max_new_tokens,
        "base": sum(ok_base) / n,
        "adapter": sum(ok_adapter) / n,
        "base_ci95": wilson(sum(ok_base), n),
        "adapter_ci95": wilson(sum(ok_adapter), n),
        "per_task": [
            {"id": t.id, "base": b, "adapter": a, "base_reply": rb[:200], "adapter_reply": ra[:200]}
            for t, b, a, rb, ra in zip(tasks, ok_base, ok_adapter, base, adapter, strict=True)
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    rows = [("metric", "base", "adapter")]
    loss = report["held_out_loss"]
    rows.append((f"held-out loss ({loss['tokens']} tokens)", f"{loss['base']:.4f}", f"{loss['adapter']:.4f}"))
    p = report.get("pass_at_1")
    if p:
        rows.append((f"pass@1 ({p['tasks']} HumanEval tasks)", f"{p['base']:.3f}", f"{p['adapter']:.3f}"))
    s = report.get("task_success")
    if s:
        rows.append((f"{s['check']} success ({s['tasks']} tasks)", f"{s['base']:.3f}", f"{s['adapter']:.3f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows)
