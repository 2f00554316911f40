"""The trainer's configuration: one dataclass, read from YAML, overridden by command-line flags.

    qlp train fit --config config/train/developer.yaml --init-r 4 --target-modules q_proj,v_proj

Every field is a flag (`--init-r`), documented by its `help` metadata (PEFT/TRL habit). `__post_init__`
validates each field alone; `schedule()` validates what depends on the data size (AdaLoRA's phases must fit
inside `total_step`, which is only known once the dataset is built).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .files import sha256_json

__all__ = ["GROUPS", "Schedule", "TrainConfig", "add_config_arguments", "config_from_args", "load_config"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GROUPS = ("data", "adalora", "optim", "run", "eval", "publish")


def _meta(help: str, group: str, resume: bool = True) -> dict[str, Any]:
    """`resume=False`: the field may differ between a run and its resumption (where, not what)."""
    return {"help": help, "group": group, "resume": resume}


def _f(default: Any, help: str, group: str, *, resume: bool = True) -> Any:
    """A config field with an immutable default."""
    return field(default=default, metadata=_meta(help, group, resume))


@dataclass
class TrainConfig:
    # ---- data ----
    agent: str = _f("developer", "agent role whose successful exchanges are kept (capture field `agent`)", "data")
    data: list[str] = field(
        default_factory=list, metadata=_meta("capture JSONL files (comma-separated on the command line)", "data")
    )
    human_eval_seed: bool = _f(True, "add the HumanEval seed set (prompt -> canonical solution)", "data")
    base_model: str = _f("models/base", "base model folder (safetensors, tokenizer, chat template)", "data")
    max_seq_len: int = _f(1024, "examples longer than this many tokens are dropped (and counted)", "data")
    eval_fraction: float = _f(0.1, "share of examples held out for evaluation, chosen by hash", "data")
    split_salt: str = _f("qlp-v1", "salt of the train/eval hash split; change it to draw another split", "data")
    max_examples: int | None = _f(None, "keep at most this many examples (a hash-chosen subset); smoke runs", "data")

    # ---- AdaLoRA (names as in PEFT's AdaLoraConfig) ----
    method: str = _f(
        "adalora",
        "adapter to train: adalora (PEFT AdaLoraConfig) or lora (plain LoraConfig with "
        "r = target_r: the rank budget AdaLoRA prunes down to)",
        "adalora",
    )
    init_r: int = _f(12, "initial rank of every adapted matrix", "adalora")
    target_r: int = _f(8, "average rank left after pruning", "adalora")
    lora_alpha: int = _f(32, "LoRA alpha (AdaLoRA scales by alpha / init_r)", "adalora")
    lora_dropout: float = _f(0.05, "dropout on the adapter input during training", "adalora")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=_meta("module names to adapt", "adalora"),
    )
    tinit: int = _f(0, "warm-up steps before any rank is pruned", "adalora")
    tfinal: int = _f(0, "final steps with the rank pattern frozen", "adalora")
    tinit_ratio: float | None = _f(None, "tinit as a fraction of total_step (overrides tinit)", "adalora")
    tfinal_ratio: float | None = _f(None, "tfinal as a fraction of total_step (overrides tfinal)", "adalora")
    deltaT: int = _f(1, "steps between two budget allocations in the pruning phase", "adalora")
    beta1: float = _f(0.85, "EMA factor of the sensitivity", "adalora")
    beta2: float = _f(0.85, "EMA factor of the uncertainty", "adalora")
    orth_reg_weight: float = _f(0.5, "weight of the orthogonality regulariser on A and B", "adalora")

    # ---- optimisation ----
    epochs: int = _f(1, "passes over the training split", "optim")
    batch_size: int = _f(4, "examples per micro-batch (per process)", "optim")
    grad_accum: int = _f(4, "micro-batches per optimizer step", "optim")
    learning_rate: float = _f(5e-4, "AdamW peak learning rate", "optim")
    weight_decay: float = _f(0.0, "AdamW weight decay", "optim")
    warmup_ratio: float = _f(0.03, "learning-rate warm-up, as a fraction of total_step", "optim")
    lr_scheduler: str = _f("linear", "learning-rate schedule after warm-up: linear, cosine or constant", "optim")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", "optim")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (sets total_step)", "optim")
    seed: int = _f(0, "seed of adapter init, data order and dropout", "optim")
    precision: str = _f("auto", "auto (bf16 on CUDA when supported, else fp32), fp32 or bf16", "optim")
    device: str = _f("auto", "auto (CUDA when present), cpu or cuda", "optim", resume=False)
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory)", "optim", resume=False)
    num_threads: int = _f(0, "CPU threads for torch (0: torch's default)", "optim", resume=False)

    # ---- run: where outputs go, how often they are written ----
    output_dir: str = _f(
        "var/train/developer", "run folder: dataset, checkpoints, adapter, reports", "run", resume=False
    )
    save_steps: int = _f(50, "checkpoint every this many optimizer steps (and at the end)", "run", resume=False)
    save_total_limit: int = _f(2, "checkpoints kept (oldest removed first)", "run", resume=False)
    logging_steps: int = _f(1, "log every this many optimizer steps", "run", resume=False)

    # ---- evaluation ----
    eval_batch_size: int = _f(4, "examples per forward pass in evaluation", "eval", resume=False)
    pass_at_1: bool = _f(True, "run HumanEval tasks of the eval split (pass@1, greedy)", "eval", resume=False)
    success_check: str | None = _f(
        None,
        "task family whose check grades greedy replies to the eval split "
        "(trainer/tasks.py, e.g. signature-json); the loop gates on it",
        "eval",
        resume=False,
    )
    eval_max_tasks: int | None = _f(None, "evaluate at most this many code tasks", "eval", resume=False)
    max_new_tokens: int = _f(384, "generation length for code tasks", "eval", resume=False)
    sandbox_timeout: float = _f(10.0, "seconds per code task (wall clock; CPU limit likewise)", "eval", resume=False)
    sandbox_memory_mb: int = _f(1024, "address-space limit of a code task (MiB)", "eval", resume=False)

    # ---- publish ----
    name: str = _f("developer", "adapter name (served and routed under it)", "publish", resume=False)
    version: str | None = _f(None, "adapter version (default: UTC timestamp)", "publish", resume=False)
    adapters_root: str = _f("models/adapters", "root of models/adapters/<name>/<version>/", "publish", resume=False)
    servers: list[str] = field(
        default_factory=list, metadata=_meta("model server URLs to hot-load the adapter into", "publish", resume=False)
    )
    gateway: str | None = _f(
        None, "gateway URL whose route for tier/agent is pointed at the adapter", "publish", resume=False
    )
    tier: str = _f("T0", "tier whose agent route the gateway updates", "publish", resume=False)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {what} (got {getattr(self, name)!r})")

        need(self.max_seq_len >= 16, "max_seq_len", "must be at least 16")
        need(0.0 <= self.eval_fraction <= 0.5, "eval_fraction", "must be in [0, 0.5]")
        need(self.max_examples is None or self.max_examples >= 2, "max_examples", "must be at least 2")
        need(self.method in {"adalora", "lora"}, "method", "must be adalora or lora")
        need(self.target_r >= 1, "target_r", "must be at least 1")
        need(self.init_r > self.target_r, "init_r", f"must be greater than target_r ({self.target_r})")
        need(self.lora_alpha > 0, "lora_alpha", "must be positive")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        need(bool(self.target_modules), "target_modules", "must name at least one module")
        need(self.tinit >= 0, "tinit", "must be >= 0")
        need(self.tfinal >= 0, "tfinal", "must be >= 0")
        for ratio in ("tinit_ratio", "tfinal_ratio"):
            value = getattr(self, ratio)
            need(value is None or 0.0 <= value < 1.0, ratio, "must be in [0, 1)")
        need(self.deltaT >= 1, "deltaT", "must be at least 1")
        need(0.0 < self.beta1 < 1.0, "beta1", "must be in (0, 1)")
        need(0.0 < self.beta2 < 1.0, "beta2", "must be in (0, 1)")
        need(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        need(self.epochs >= 1, "epochs", "must be at least 1")
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.grad_accum >= 1, "grad_accum", "must be at least 1")
        need(self.learning_rate > 0, "learning_rate", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        need(
            self.lr_scheduler in {"linear", "cosine", "constant"}, "lr_scheduler", "must be linear, cosine or constant"
        )
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be at least 1")
        need(self.precision in {"auto", "fp32", "bf16"}, "precision", "must be auto, fp32 or bf16")
        need(self.device in {"auto", "cpu", "cuda"}, "device", "must be auto, cpu or cuda")
        need(self.num_threads >= 0, "num_threads", "must be >= 0")
        need(self.save_steps >= 1, "save_steps", "must be at least 1")
        need(self.save_total_limit >= 1, "save_total_limit", "must be at least 1")
        need(self.logging_steps >= 1, "logging_steps", "must be at least 1")
        need(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        need(self.eval_max_tasks is None or self.eval_max_tasks >= 0, "eval_max_tasks", "must be >= 0")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        from .tasks import TASKS

        need(
            self.success_check is None or self.success_check in TASKS,
            "success_check",
            f"must be one of {', '.join(sorted(TASKS))}",
        )
        need(self.sandbox_timeout > 0, "sandbox_timeout", "must be positive")
        need(self.sandbox_memory_mb >= 64, "sandbox_memory_mb", "must be at least 64")
        need(bool(NAME_RE.match(self.name)), "name", "must be 1-64 of [A-Za-z0-9._-], not starting with . - _")
        need(
            self.version is None or bool(NAME_RE.match(self.version)),
            "version",
            "must be 1-64 of [A-Za-z0-9._-], not starting with . - _",
        )
        need(bool(re.match(r"^T[0-9]$", self.tier)), "tier", "must be T0..T9")

    # ---- derived values ----

    def schedule(self, n_train: int, world_size: int = 1) -> Schedule:
        """Steps of the run for `n_train` examples; AdaLoRA's phases checked against them."""
        if n_train < 1:
            raise ConfigError("the training split is empty: nothing to train on")
        per_step = self.batch_size * self.grad_accum * world_size
        steps_per_epoch = math.ceil(n_train / per_step)
        total = self.max_steps if self.max_steps is not None else steps_per_epoch * self.epochs
        tinit = round(self.tinit_ratio * total) if self.tinit_ratio is not None else self.tinit
        tfinal = round(self.tfinal_ratio * total) if self.tfinal_ratio is not None else self.tfinal
        if self.method == "adalora" and tinit >= total - tfinal:
            raise ConfigError(
                f"AdaLoRA phases do not fit: tinit ({tinit}) + tfinal ({tfinal}) must leave at least one "
                f"pruning step inside total_step ({total} = ceil({n_train} examples / ({self.batch_size} "
                f"batch x {self.grad_accum} accumulation x {world_size} processes)) x {self.epochs} epochs"
                + (f", or max_steps {self.max_steps}" if self.max_steps is not None else "")
                + "). Lower tinit/tfinal (or their ratios), or train longer."
            )
        return Schedule(total, tinit, tfinal, steps_per_epoch, per_step, warmup_steps=int(self.warmup_ratio * total))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_hash(self) -> str:
        """Hash of the fields that decide the training trajectory: a resume must match it."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("resume", True)}
        return sha256_json(keep)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @property
    def fit_path(self) -> Path:
        """The trained adapter in PEFT's format (`qlp train fit` writes it, export reads it)."""
        return self.output_path / ("adalora" if self.method == "adalora" else "lora-fit")


@dataclass(frozen=True)
class Schedule:
    total_step: int
    tinit: int
    tfinal: int
    steps_per_epoch: int
    examples_per_step: int
    warmup_steps: int


# ---- YAML + flags ----


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional) for `X | None`."""
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """A YAML value or a flag string, turned into the field's type (ConfigError when it cannot be)."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null", ""}):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if typing.get_origin(inner) is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError("expected a list")
            return [str(v) for v in value]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
                return value.lower() in {"true", "yes", "1"}
            raise TypeError("expected true or false")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if inner is str:
            if not isinstance(value, str | int | float):
                raise TypeError("expected a string")
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc} (got {value!r})") from exc
    raise ConfigError(f"{name}: unsupported field type {tp}")


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then `overrides` (flags). Unknown keys are errors, not ignored."""
    hints = _hints()
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: config file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of field: value")
        for key, value in raw.items():
            if key not in hints:
                raise ConfigError(f"{path}: unknown field {key!r}")
            values[key] = _coerce(key, hints[key], value)
    for key, value in (overrides or {}).items():
        if key not in hints:
            raise ConfigError(f"unknown field {key!r}")
        values[key] = _coerce(key, hints[key], value)
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(str(exc)) from exc


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one flag per field; flags not given do not override the file."""
    parser.add_argument("--config", type=Path, help="YAML file of config fields (flags override it)")
    hints = _hints()
    titles = {
        "data": "data",
        "adalora": "AdaLoRA",
        "optim": "optimisation",
        "run": "run folder",
        "eval": "evaluation",
        "publish": "publish",
    }
    groups = {g: parser.add_argument_group(f"config: {titles[g]}") for g in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        inner, _ = _base_type(hints[f.name])
        group = groups[f.metadata["group"]]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        help_ = f"{f.metadata['help']} [default: {default}]"
        if inner is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(args.config, overrides)
