"""Trainer throughput on a GPU: bf16, a larger batch; tokens/s and peak memory. Not run by CI or by
`make bench` (its name does not start with bench_); run it by hand on a machine with CUDA:

    python -m bench.gpu_train                        # AdaLoRA (qlp train) and the plain LoRA loop
    python -m bench.gpu_train --batch-size 32 --seq-len 1024 --steps 30 --which trainer

The same three loops as bench/bench_trainer.py (same data: the HumanEval seed set), on one GPU, each in
turn, with torch.cuda.max_memory_allocated reset before each. Prints one line per loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.bench_trainer import build, run_plain, run_trainer


def main(argv: list[str]) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024, help="max_seq_len (longer examples are dropped)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per loop (the first is not timed)")
    p.add_argument("--which", choices=["all", "trainer", "lora", "adalora"], default="all")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA device; this benchmark is for a lent GPU", file=sys.stderr)
        return 2
    print(
        f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 "
        f"{'supported' if torch.cuda.is_bf16_supported() else 'NOT supported (fp32)'}"
    )
    with tempfile.TemporaryDirectory(prefix="qlp-gpu-train-") as tmp:
        cfg, dataset = build(
            Path(tmp),
            args.steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_seq_len=args.seq_len,
            eval_fraction=0.05,
            device="cuda",
            precision="auto",
            gradient_checkpointing=args.gradient_checkpointing,
            tinit=1,
            tfinal=1,
            num_threads=0,
        )
        print(
            f"data: {len(dataset.train)} examples (HumanEval seed), max_seq_len {cfg.max_seq_len}, "
            f"batch {cfg.batch_size} x accumulation {cfg.grad_accum}, r={cfg.init_r}, q/k/v/o, "
            f"{args.steps} steps (first not timed)"
        )
        loops = ["trainer", "lora", "adalora"] if args.which == "all" else [args.which]
        for name in loops:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            rate = run_trainer(cfg, dataset) if name == "trainer" else run_plain(cfg, dataset, name)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"  {name:<8} {rate:>10,.0f} tokens/s   peak memory {peak:6.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
