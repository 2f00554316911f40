"""Trainer throughput: `qlp train`'s AdaLoRA loop against a plain PEFT LoRA loop, same data, same run.

    python -m bench bench_trainer            (part of `make bench`)
    QLP_BENCH_STEPS=8 QLP_BENCH_ROUNDS=3 python -m bench bench_trainer

Three loops over the same batches (HumanEval seed set, chat-templated and masked by the trainer, the same
shuffled order), the same model, optimizer, learning rate, batch size, accumulation and target modules:
  * trainer   trainer.train.train: AdaLoRA (init_r) with update_and_allocate, clipping, scheduler, logs
  * lora      a bare PEFT LoRA loop (r = init_r): forward, backward, AdamW step, zero_grad   <- baseline
  * adalora   the same bare loop with AdaLoRA and update_and_allocate: what AdaLoRA itself costs
Rounds are interleaved, the order rotated each round, because this machine is shared; the median
tokens/s of each is reported, the first optimizer step of each run (allocation warm-up) excluded.
Tokens are the non-padding tokens fed to the model.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = int(os.environ.get("QLP_BENCH_STEPS", "5"))
ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "3"))
# One torch thread by default: this machine's 2 cores are shared, and two OpenMP threads that keep being
# preempted wait for each other at every barrier (5-6x slower steps under load, and very noisy).
THREADS = int(os.environ.get("QLP_BENCH_THREADS", "1"))

SETTINGS: dict[str, Any] = dict(
    human_eval_seed=True,
    data=[],
    base_model=str(ROOT / "models" / "base"),
    max_seq_len=256,
    eval_fraction=0.1,
    init_r=8,
    target_r=4,
    lora_alpha=16,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    batch_size=2,
    grad_accum=2,
    epochs=1,
    learning_rate=5e-4,
    warmup_ratio=0.0,
    tinit=1,
    tfinal=1,
    save_steps=10_000,
    logging_steps=10_000,
    num_threads=THREADS,
)


def make_config(output_dir: Path, steps: int, **overrides: Any) -> Any:
    from trainer.config import load_config

    return load_config(None, {**SETTINGS, "output_dir": str(output_dir), "max_steps": steps, **overrides})


def run_trainer(cfg: Any, dataset: Any) -> float:
    """tokens/s of trainer.train, steps 2..N."""
    from trainer.train import train

    marks: list[tuple[int, float]] = []
    train(
        cfg,
        dataset,
        resume=False,
        progress=False,
        on_step=lambda info: marks.append((info.tokens, info.tokens / info.tokens_per_s)),
    )
    (t1, s1), (tn, sn) = marks[0], marks[-1]
    return (tn - t1) / (sn - s1)


def run_plain(cfg: Any, dataset: Any, method: str) -> float:
    """tokens/s of a bare PEFT loop (method: lora | adalora), steps 2..N, same batches as the trainer."""
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from trainer.data import load_tokenizer
    from trainer.train import _epoch_groups, collate, encode_split, load_base_model, resolve_device

    tok = load_tokenizer(cfg.base_model)
    data = encode_split(tok, dataset.train, cfg.max_seq_len)
    schedule = cfg.schedule(len(data))
    device, dtype = resolve_device(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model = load_base_model(cfg.base_model, device, dtype)
    torch.manual_seed(cfg.seed)
    common = dict(
        task_type="CAUSAL_LM",
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
    )
    if method == "lora":
        peft_config: Any = LoraConfig(r=cfg.init_r, **common)
    else:
        peft_config = AdaLoraConfig(
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            tinit=schedule.tinit,
            tfinal=schedule.tfinal,
            total_step=schedule.total_step,
            **common,
        )
    model = get_peft_model(model, peft_config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    from trainer.train import Dist

    tokens, seconds = 0, 0.0
    for step in range(schedule.total_step):
        epoch, k = divmod(step, schedule.steps_per_epoch)
        group = _epoch_groups(len(data), epoch, cfg, Dist())[k]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for micro in group:
            batch = {name: t.to(device) for name, t in collate([data[j] for j in micro], tok.pad_token_id).items()}
            (model(**batch).loss / len(group)).backward()
            n += int(batch["attention_mask"].sum())
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step + 1)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step pays for allocations; the trainer figure skips it too
            tokens += n
            seconds += time.perf_counter() - t0
    return tokens / seconds


def build(work: Path, steps: int, **overrides: Any) -> tuple[Any, Any]:
    from trainer.data import build_dataset

    cfg = make_config(work / "out", steps, **overrides)
    dataset = build_dataset(cfg, work / "dataset", replace=True)
    return cfg, dataset


def main(argv: list[str]) -> int:
    import torch

    with tempfile.TemporaryDirectory(prefix="qlp-bench-train-") as tmp:
        cfg, dataset = build(Path(tmp), STEPS)
        rates: dict[str, list[float]] = {"trainer": [], "lora": [], "adalora": []}
        order = list(rates)
        for r in range(ROUNDS):
            # Rotated each round: the first loop of a process runs measurably slower (allocator warm-up),
            # and this machine's load drifts; every loop takes every position once in 3 rounds.
            for name in order[r % 3 :] + order[: r % 3]:
                rates[name].append(run_trainer(cfg, dataset) if name == "trainer" else run_plain(cfg, dataset, name))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"data: HumanEval seed, {len(dataset.train)} train examples, max_seq_len {cfg.max_seq_len}; "
        f"batch {cfg.batch_size} x accumulation {cfg.grad_accum}; q,k,v,o; r={cfg.init_r}; "
        f"{STEPS} steps x {ROUNDS} rounds; torch threads {torch.get_num_threads()}, device cpu"
    )
    for name, label in (
        ("trainer", "qlp train (AdaLoRA)"),
        ("adalora", "bare AdaLoRA loop"),
        ("lora", "bare PEFT LoRA loop (baseline)"),
    ):
        runs = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"  {label:<32} {med[name]:>8,.0f} tokens/s  (runs: {runs})")
    print(
        f"  qlp train / plain LoRA: {med['trainer'] / med['lora']:.2f}x; "
        f"bare AdaLoRA / plain LoRA: {med['adalora'] / med['lora']:.2f}x"
    )
    return 0
