"""AdaLoRA -> plain LoRA, in the format vLLM (and the CPU model server) load.

    qlp train export --adalora var/train/developer/adalora --out var/train/developer/lora

vLLM refuses PEFT's AdaLoRA format (bare `lora_A/B/E` tensors, a boolean `rank_pattern`, peft_type
ADALORA). Per adapted module, AdaLoRA adds

    delta_W x = B (A * E) x * scaling / (ranknum + 1e-5)          (PEFT's SVDLinear.forward)

with E the singular values (pruned ones are 0 or already cut out), `scaling` = lora_alpha and `ranknum`
the rank the module was created with. The same product as plain LoRA (delta_W x = B' A' x * alpha/r):

    A' = (A * E)[kept] * scaling / (ranknum + 1e-5)      B' = B[:, kept]      lora_alpha = r  (scale 1)

Modules left with rank 0 are dropped; the others are padded with zero rows of A' and zero columns of B'
to one rank that vLLM accepts (it takes a single `r` per adapter): zero padding leaves B'A' unchanged.
`target_modules` lists full module names, so a dropped module gets no LoRA layer at all.

The check in `export_lora` proves it: base + exported LoRA (plain PEFT) against base + AdaLoRA, logits on sample
inputs, max |diff| <= 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError
from .files import atomic_dir, write_json
from .peft_compat import adalora_quiet

__all__ = ["VLLM_RANKS", "ExportResult", "default_sample_ids", "export_lora", "fold_adalora", "padded_rank"]

# LoRA ranks vLLM accepts for --max-lora-rank; the exported adapter's r is padded up to one of them.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER = "default"
DEFAULT_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "What does `git rebase -i` do?",
    "def is_prime(n):",
)


@dataclass
class ExportResult:
    path: Path
    r: int  # the padded rank written to adapter_config.json
    rank_pattern: dict[str, int]  # kept rank per module, zero-rank modules included
    modules: int  # modules with a LoRA layer in the export
    max_abs_diff: float | None = None  # logits, exported LoRA vs AdaLoRA (None: not checked)
    adapter_effect: float | None = None  # logits, AdaLoRA vs base: shows the check is not vacuous

    def card(self) -> dict[str, Any]:
        return {
            "format": "peft LORA (from AdaLoRA)",
            "r": self.r,
            "lora_alpha": self.r,
            "modules": self.modules,
            "rank_pattern": self.rank_pattern,
            "total_rank": sum(self.rank_pattern.values()),
            "equivalence": {
                "max_abs_diff": self.max_abs_diff,
                "adapter_effect": self.adapter_effect,
                "tolerance": 1e-4,
            },
        }


def padded_rank(max_rank: int) -> int:
    for r in VLLM_RANKS:
        if r >= max_rank:
            return r
    raise ExportError(f"rank {max_rank} is above the largest rank vLLM accepts ({VLLM_RANKS[-1]})")


def _load_base(base_model: str | Path) -> Any:
    from transformers import AutoModelForCausalLM

    # float64: the fold is computed without rounding, and the equivalence check compares two functions,
    # not two float32 roundings of them. In float32 this model's hidden states reach magnitudes where one
    # ulp is ~1e-4, so *any* reordering of the adapter arithmetic moves logits by about that much.
    return AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float64).eval()


def _load_adalora(base: Any, adalora_dir: Path) -> Any:
    from peft import PeftModel

    config_file = adalora_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ExportError(f"{adalora_dir}: no adapter_config.json (not a PEFT adapter folder)")
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type not in ("ADALORA", "LORA"):
        raise ExportError(f"{adalora_dir}: peft_type is {peft_type!r}, expected ADALORA or LORA")
    with adalora_quiet():
        model = PeftModel.from_pretrained(base, str(adalora_dir), adapter_name=ADAPTER, is_trainable=False)
    return model.to(torch.float64).eval()


def fold_adalora(peft_model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module name ("model.layers.0.self_attn.q_proj"): (A', B') with the kept ranks only. A plain
    LoRA fit (`method: lora`) folds the same way: A' = A x alpha/r, B' = B, every rank kept."""
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    out = {}
    module: Any  # a LoraLayer: torch types its submodule attributes as Tensor
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            raise ExportError(f"{name}: only Linear layers can be exported (vLLM LoRA)")
        if not isinstance(module, AdaLoraLayer):
            plain_a = module.lora_A[ADAPTER].weight.detach().double()
            out[name.removeprefix("base_model.model.")] = (
                plain_a * float(module.scaling[ADAPTER]),
                module.lora_B[ADAPTER].weight.detach().double(),
            )
            continue
        A = module.lora_A[ADAPTER].detach().double()
        E = module.lora_E[ADAPTER].detach().double()
        B = module.lora_B[ADAPTER].detach().double()
        factor = float(module.scaling[ADAPTER]) / (float(module.ranknum[ADAPTER].detach()) + 1e-5)
        # Zero singular values are the pruned triplets (masked in place while training); the saved
        # checkpoint has most of them cut out already, this also catches the rest.
        kept = (E.view(-1) != 0).nonzero().view(-1)
        out[name.removeprefix("base_model.model.")] = ((A * E)[kept] * factor, B[:, kept])
    if not out:
        raise ExportError("the model has no LoRA or AdaLoRA layers")
    return out


def export_lora(
    base_model: str | Path,
    adalora_dir: Path,
    out_dir: Path,
    *,
    replace: bool = False,
    check: bool = True,
    sample_ids: list[list[int]] | None = None,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Write a plain LoRA adapter folder to `out_dir` (atomically); by default prove it equivalent."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adalora_dir, out_dir = Path(adalora_dir), Path(out_dir)
    base = _load_base(base_model)
    ada = _load_adalora(base, adalora_dir)
    folded = fold_adalora(ada)
    rank_pattern = {name: int(a.shape[0]) for name, (a, _) in folded.items()}
    live = {name: ab for name, ab in folded.items() if ab[0].shape[0] > 0}
    if not live:
        raise ExportError(f"{adalora_dir}: every module was pruned to rank 0; there is nothing to export")
    r = padded_rank(max(a.shape[0] for a, _ in live.values()))
    tensors = {}
    for name, (a, b) in live.items():
        k = a.shape[0]
        a_pad = torch.zeros(r, a.shape[1], dtype=torch.float32)
        b_pad = torch.zeros(b.shape[0], r, dtype=torch.float32)
        a_pad[:k] = a
        b_pad[:, :k] = b
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_pad.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_pad.contiguous()
    ada_config = json.loads((adalora_dir / "adapter_config.json").read_text())
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=r,  # scaling alpha/r = 1: AdaLoRA's scale is folded into A'
        target_modules=sorted(live),  # full names: modules pruned to rank 0 get no layer
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        base_model_name_or_path=ada_config.get("base_model_name_or_path") or str(base_model),
    )
    result = ExportResult(out_dir, r, rank_pattern, len(live))
    with atomic_dir(out_dir, replace=replace) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if check:
            # Compare against the AdaLoRA model already in memory; then drop its layers (unload, not
            # merge) so that the LoRA is applied to the untouched base weights.
            inputs = sample_ids or default_sample_ids(base_model)
            ada_logits = _logits(ada, inputs)
            with ada.disable_adapter():
                base_logits = _logits(ada, inputs)
            plain = ada.unload()
            lora_logits = _logits(_load_lora(plain, tmp), inputs)
            result.max_abs_diff = _max_diff(ada_logits, lora_logits)
            result.adapter_effect = _max_diff(ada_logits, base_logits)
            if not result.max_abs_diff <= tolerance:
                raise ExportError(
                    f"exported LoRA is not equivalent to the AdaLoRA model: max |logit diff| "
                    f"{result.max_abs_diff:.3g} > {tolerance}"
                )
        write_json(tmp / "export.json", result.card())
    return result


def _load_lora(base: Any, lora_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(lora_dir), is_trainable=False).to(torch.float64).eval()


@torch.inference_mode()
def _logits(model: Any, inputs: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0] for ids in inputs]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def default_sample_ids(base_model: str | Path) -> list[list[int]]:
    from .data import load_tokenizer

    tok = load_tokenizer(base_model)
    out = []
    for p in DEFAULT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        out.append(list(tok(text + "Sure. Here is", add_special_tokens=False)["input_ids"]))
    return out
