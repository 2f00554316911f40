"""AdaLoRA -> plain LoRA: the exported adapter is vLLM's format and computes the same function."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.trainer.conftest import Exported, TrainedRun
from trainer.errors import ExportError
from trainer.export import VLLM_RANKS, export_lora, padded_rank
from trainer.peft_compat import adalora_quiet


def test_exported_lora_gives_the_adalora_logits(exported: Exported) -> None:
    r = exported.result
    # Base + LoRA (plain PEFT, loaded from the written folder) against base + AdaLoRA (PEFT), float64.
    assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-4
    # Not vacuous: the adapter itself moves the logits by far more than the tolerance.
    assert r.adapter_effect is not None and r.adapter_effect > 100 * 1e-4


def test_export_is_in_the_format_vllm_loads(exported: Exported, trained: TrainedRun) -> None:
    config = json.loads((exported.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]
    assert config["use_rslora"] is False and config["use_dora"] is False
    kept = {m: k for m, k in trained.result.rank_pattern.items() if k > 0}
    assert sorted(config["target_modules"]) == sorted(kept)  # modules pruned to rank 0 are gone
    assert config["r"] == padded_rank(max(kept.values()))
    name = re.compile(r"^base_model\.model\.model\.layers\.\d+\.self_attn\.[qv]_proj\.lora_[AB]\.weight$")
    with safe_open(str(exported.path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(name.match(k) for k in keys), keys[:4]
        for module, k in kept.items():
            a = f.get_tensor(f"base_model.model.{module}.lora_A.weight")
            b = f.get_tensor(f"base_model.model.{module}.lora_B.weight")
            assert a.shape[0] == b.shape[1] == config["r"] and a.dtype == torch.float32
            # Padding rows/columns beyond the module's own rank are zero.
            assert not a[k:].any() and not b[:, k:].any()
    card = json.loads((exported.path / "export.json").read_text())
    assert card["rank_pattern"] == trained.result.rank_pattern


def _tiny_adalora(tmp_path: Path) -> tuple[Path, Path]:
    """A 2-layer Llama with an AdaLoRA adapter whose ranks are 3, 1, 0 and 2 (random, non-zero values)."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base, AdaLoraConfig(init_r=4, target_r=2, lora_alpha=16, total_step=10, target_modules=["q_proj", "v_proj"])
    )
    keep = iter([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    pattern = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
            if "lora_E" in n:
                mask = torch.tensor(next(keep), dtype=torch.bool)
                p.masked_fill_(~mask.view(-1, 1), 0.0)
                pattern[n.removeprefix("base_model.model.")] = mask.tolist()
    model.peft_config["default"].rank_pattern = pattern
    with adalora_quiet():  # rank-0 modules look like unsharded ZeRO-3 tensors to PEFT
        model.save_pretrained(tmp_path / "adalora")
    return tmp_path / "base", tmp_path / "adalora"


def test_fold_drops_pruned_ranks_and_zero_rank_modules_and_pads(tmp_path: Path) -> None:
    base, adalora = _tiny_adalora(tmp_path)
    result = export_lora(base, adalora, tmp_path / "lora", sample_ids=[[1, 5, 9, 33, 2, 7]])
    assert sorted(result.rank_pattern.values()) == [0, 1, 2, 3]
    assert result.modules == 3 and result.r == 8
    # float64 check; what is left is the float32 rounding of the stored A' (~1e-7 of a 0.5 effect).
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-6
    assert result.adapter_effect is not None and result.adapter_effect > 1e-3


def test_a_plain_lora_fit_exports_with_alpha_over_r_folded_in(tmp_path: Path) -> None:
    # `method: lora`: the fit is a PEFT LoRA (alpha 16, r 4); the export is vLLM's plain LoRA at scale 1.
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_dir, _ = _tiny_adalora(tmp_path / "ada")
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "lora-fit")
    result = export_lora(base_dir, tmp_path / "lora-fit", tmp_path / "lora", sample_ids=[[1, 5, 9, 33, 2, 7]])
    assert result.r == 8 and set(result.rank_pattern.values()) == {4} and result.modules == 4
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-6
    assert result.adapter_effect is not None and result.adapter_effect > 1e-3
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_alpha"] == 8


def test_export_refuses_a_folder_that_is_no_lora(tmp_path: Path) -> None:
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    base_dir, _ = _tiny_adalora(tmp_path / "ada")
    with pytest.raises(ExportError, match="expected ADALORA or LORA"):
        export_lora(base_dir, tmp_path / "ia3", tmp_path / "again")
    assert not (tmp_path / "again").exists()
