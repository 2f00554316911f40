"""The AdaLoRA training loop.

    qlp train fit --config config/train/developer.yaml
    torchrun --nproc-per-node 4 -m trainer fit --config ...     # several GPUs (DDP); see docs/trainer.md

A hand-written loop rather than HF's Trainer, because AdaLoRA needs one call the Trainer never makes:
`update_and_allocate(global_step)` after every `optimizer.step()` and before the gradients are cleared
(it reads `p.grad` to score each singular triplet; PEFT issues #1327, #1721). Without it no rank is ever
pruned and the saved adapter carries no rank pattern. The order per optimizer step is therefore:

    backward (x grad_accum) -> clip -> optimizer.step -> scheduler.step -> update_and_allocate(step)
    -> zero_grad

`global_step` counts completed optimizer steps from 1, so the final allocation (step total_step - tfinal)
is reached even with tfinal = 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Schedule, TrainConfig
from .data import IGNORE_INDEX, Dataset, Encoded, encode, load_tokenizer
from .errors import CheckpointError, TrainingInterrupted
from .files import atomic_dir, write_json
from .peft_compat import adalora_quiet

__all__ = [
    "Dist",
    "StepInfo",
    "TrainResult",
    "build_adapter",
    "collate",
    "dist_setup",
    "encode_split",
    "load_base_model",
    "resolve_device",
    "train",
]

log = logging.getLogger("qlp.trainer")
ADAPTER = "default"  # PEFT's adapter name inside the training model


# ---- devices and processes ----


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_setup() -> Dist:
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK; start the process group from them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(cfg: TrainConfig, dist: Dist = Dist()) -> tuple[torch.device, torch.dtype]:
    """CPU by default; CUDA when present (or asked); bf16 weights on CUDA when the GPU supports it."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("device: cuda was asked for but torch sees no GPU")
    device = torch.device(f"cuda:{dist.local_rank}" if use_cuda else "cpu")
    if cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16
    return device, torch.float32


def load_base_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to() by its own wrapper


def build_adapter(model: Any, cfg: TrainConfig, schedule: Schedule) -> Any:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    config: Any = (
        LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.target_r,  # AdaLoRA's final budget: the equal-parameter comparison
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
        )
        if cfg.method == "lora"
        else AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
            tinit=schedule.tinit,
            tfinal=schedule.tfinal,
            deltaT=cfg.deltaT,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
            total_step=schedule.total_step,
        )
    )
    # Adapter weights are created from torch's RNG: seeded here so a run (and its resume) is reproducible.
    torch.manual_seed(cfg.seed)
    # PEFT keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype): AdaLoRA's
    # importance scores and the orthogonality penalty are not meaningful at bf16 resolution.
    return get_peft_model(model, config, adapter_name=ADAPTER)


# ---- data ----


def encode_split(tokenizer: Any, examples: list[Any], max_seq_len: int) -> list[Encoded]:
    out = []
    for ex in examples:
        enc = encode(tokenizer, ex, max_seq_len)
        if enc is not None:  # the dataset stage already dropped long examples; a changed tokenizer may not
            out.append(enc)
    return out


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding carries no loss and no attention."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _epoch_groups(n: int, epoch: int, cfg: TrainConfig, dist: Dist) -> list[list[list[int]]]:
    """This process's micro-batches of one epoch, grouped per optimizer step.

    The order is a permutation seeded by (seed, epoch): a resumed run recomputes it instead of storing
    it. Each process gets every world-th index of the permutation, padded by wrapping around so that all
    processes run the same number of steps (DDP would hang otherwise).
    """
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / dist.world)
    order = (order * math.ceil(per_rank * dist.world / n))[: per_rank * dist.world]
    mine = order[dist.rank :: dist.world]
    micro = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    return [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]


# ---- the loop ----


@dataclass
class StepInfo:
    step: int
    total_step: int
    epoch: int
    loss: float
    lr: float
    tokens: int  # training tokens (non-padding, all processes) so far in this process's run
    tokens_per_s: float
    budget: int | None  # AdaLoRA's rank budget after this step


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    total_step: int
    tokens: int
    seconds: float
    resumed_from: int | None
    rank_pattern: dict[str, int]
    final_loss: float | None
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "adapter_dir": str(self.adapter_dir),
            "steps": self.steps,
            "total_step": self.total_step,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "resumed_from": self.resumed_from,
            "final_loss": self.final_loss,
            "rank_pattern": self.rank_pattern,
        }


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (after a checkpoint) instead of
    dying mid-step: a preempted batch job loses at most one step."""
    stop = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %s: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _any_process(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True if the flag is set in any process: all stop at the same step, or DDP would wait forever."""
    if dist.world == 1:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([int(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def _lora_state(peft_model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def _rank_summary(peft_model: Any) -> dict[str, int]:
    """Kept rank per adapted module, from the rank pattern (all ranks before the first allocation)."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    if str(getattr(peft_model.peft_config[ADAPTER].peft_type, "value", "")) == "LORA":
        return {
            name.removeprefix("base_model.model."): int(m.r[ADAPTER])
            for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
        }

    # Keys read "base_model.model.<module>.lora_E.default" (or without ".default" once PEFT has saved).
    pattern = {
        k.split(".lora_E")[0].removeprefix("base_model.model."): v
        for k, v in (peft_model.peft_config[ADAPTER].rank_pattern or {}).items()
    }
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, AdaLoraLayer) and ADAPTER in module.lora_E:
            module_name = name.removeprefix("base_model.model.")
            kept = pattern.get(module_name)
            out[module_name] = int(sum(kept)) if kept is not None else int(module.lora_E[ADAPTER].shape[0])
    return out


def train(
    cfg: TrainConfig,
    dataset: Dataset,
    *,
    tokenizer: Any | None = None,
    resume: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    handle_signals: bool = False,
    progress: bool = True,
    dist: Dist | None = None,
) -> TrainResult:
    """Train an adapter (AdaLoRA, or plain LoRA with `method: lora`) on `dataset`; write checkpoints and
    `cfg.fit_path` (`<output_dir>/adalora/` or `lora-fit/`).

    With `resume`, continues from the newest checkpoint under `output_dir` (which must come from the same
    configuration and dataset). Raises TrainingInterrupted after a signal, once a checkpoint is saved.
    """
    dist = dist or dist_setup()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    root = cfg.output_path
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.base_model)
    train_set = encode_split(tokenizer, dataset.train, cfg.max_seq_len)
    schedule = cfg.schedule(len(train_set), dist.world)
    device, dtype = resolve_device(cfg, dist)
    random.seed(cfg.seed)

    model = load_base_model(cfg.base_model, device, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = build_adapter(model, cfg, schedule)
    # AdaLoraModel owns update_and_allocate and the rank allocator; plain LoRA has neither.
    adalora = peft_model.base_model if cfg.method == "adalora" else None
    lora_budget = cfg.target_r * len(_rank_summary(peft_model)) if adalora is None else 0
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        cfg.lr_scheduler if cfg.lr_scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=schedule.warmup_steps,
        num_training_steps=schedule.total_step,
    )

    start_step, resumed_from, history = 0, None, []
    ckpt = latest_checkpoint(root) if resume else None
    if ckpt is not None:
        adapter_state, state = load_checkpoint(ckpt, cfg.resume_hash(), dataset.hash)
        live = _lora_state(peft_model)
        if set(live) != set(adapter_state) or any(live[k].shape != adapter_state[k].shape for k in live):
            raise CheckpointError(f"{ckpt.path}: adapter tensors do not match this model")
        with torch.no_grad():
            for k, p in live.items():
                p.copy_(adapter_state[k].to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if adalora is not None:
            alloc = adalora.rankallocator
            to_dev = {
                k: {n: t.to(device) for n, t in state["allocator"][k].items()}
                for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")
            }
            alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
                to_dev["ipt"],
                to_dev["exp_avg_ipt"],
                to_dev["exp_avg_unc"],
            )
            peft_model.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]
        set_rng_state(state["rng"])
        history = list(state.get("log", []))
        start_step = resumed_from = ckpt.step
        if dist.main:
            log.info("resumed from %s (step %d of %d)", ckpt.path, ckpt.step, schedule.total_step)
    elif dist.main and (root / "checkpoints").exists() and not resume:
        import shutil

        shutil.rmtree(root / "checkpoints")

    ddp: Any = None
    forward_model: Any = peft_model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(peft_model, device_ids=[device.index] if device.type == "cuda" else None)
        forward_model = ddp

    def checkpoint(step: int) -> Path | None:
        if not dist.main:
            return None
        state: dict[str, Any] = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "log": history,
        }
        if adalora is not None:
            alloc = adalora.rankallocator
            state["allocator"] = {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc}
            state["rank_pattern"] = peft_model.peft_config[ADAPTER].rank_pattern
        return save_checkpoint(
            root, step, _lora_state(peft_model), state, cfg.resume_hash(), dataset.hash, cfg.save_total_limit
        )

    pad_id = tokenizer.pad_token_id
    tokens = 0
    elapsed = 0.0
    last_loss: float | None = history[-1]["loss"] if history else None
    log_file = root / "log.jsonl"
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            log_file.unlink(missing_ok=True)  # a fresh run does not continue an older run's log
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=schedule.total_step,
            initial=start_step,
            unit="step",
            desc="AdaLoRA" if adalora else "LoRA",
            dynamic_ncols=True,
        )
    groups_cache: dict[int, list[list[list[int]]]] = {}
    peft_model.train()
    with _stop_on_signals(handle_signals) as stop:
        try:
            for step in range(start_step, schedule.total_step):
                t0 = time.perf_counter()
                epoch, in_epoch = divmod(step, schedule.steps_per_epoch)
                if epoch not in groups_cache:
                    groups_cache = {epoch: _epoch_groups(len(train_set), epoch, cfg, dist)}
                group = groups_cache[epoch][in_epoch]
                step_loss = 0.0
                step_tokens = 0
                for i, micro in enumerate(group):
                    batch = {n: t.to(device) for n, t in collate([train_set[j] for j in micro], pad_id).items()}
                    sync = ddp is None or i == len(group) - 1
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        # Labels go in so that AdaLoRA's forward adds its orthogonality penalty to the loss.
                        loss = forward_model(**batch).loss / len(group)
                        loss.backward()
                    step_loss += loss.item()
                    step_tokens += int(batch["attention_mask"].sum())
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                global_step = step + 1
                # After the update, before the gradients are cleared: the allocator scores p * p.grad.
                if adalora is not None:
                    adalora.update_and_allocate(global_step)
                optimizer.zero_grad(set_to_none=True)

                elapsed += time.perf_counter() - t0
                tokens += step_tokens * dist.world
                last_loss = step_loss
                budget = adalora.rankallocator.budget_schedule(global_step)[0] if adalora else lora_budget
                info = StepInfo(
                    global_step,
                    schedule.total_step,
                    epoch,
                    step_loss,
                    scheduler.get_last_lr()[0],
                    tokens,
                    tokens / elapsed if elapsed else 0.0,
                    budget,
                )
                if dist.main:
                    if global_step % cfg.logging_steps == 0 or global_step == schedule.total_step:
                        record = {
                            "step": global_step,
                            "epoch": epoch,
                            "loss": round(step_loss, 5),
                            "lr": info.lr,
                            "budget": budget,
                            "tokens": tokens,
                            "tokens_per_s": round(info.tokens_per_s, 1),
                        }
                        history.append(record)
                        with open(log_file, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        log.info(
                            "step %d/%d loss %.4f lr %.2e budget %s %.0f tok/s",
                            global_step,
                            schedule.total_step,
                            step_loss,
                            info.lr,
                            budget,
                            info.tokens_per_s,
                        )
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{step_loss:.4f}", budget=budget, refresh=False)
                    if global_step % cfg.save_steps == 0 and global_step != schedule.total_step:
                        checkpoint(global_step)
                if on_step is not None:
                    on_step(info)
                if _any_process(stop.is_set(), dist, device) and global_step != schedule.total_step:
                    path = (
                        checkpoint(global_step)
                        if global_step % cfg.save_steps
                        else root / "checkpoints" / f"step-{global_step:06d}"
                    )
                    raise TrainingInterrupted(global_step, path)
        finally:
            if bar is not None:
                bar.close()

    final_step = schedule.total_step
    adapter_dir = cfg.fit_path
    if dist.main:
        if start_step < final_step:  # a completed run that is "resumed" only rewrites its adapter
            checkpoint(final_step)
        with atomic_dir(adapter_dir, replace=True) as tmp, adalora_quiet():
            peft_model.save_pretrained(str(tmp))
    result = TrainResult(
        adapter_dir,
        final_step - start_step,
        final_step,
        tokens,
        elapsed,
        resumed_from,
        _rank_summary(peft_model),
        last_loss,
        history,
    )
    if dist.main:
        write_json(
            root / "train_result.json",
            {**result.summary(), "schedule": schedule.__dict__, "dataset_hash": dataset.hash, "config": cfg.to_dict()},
        )
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    return result
