"""The prepared base model: built once, a plain safetensors folder that stands without the gguf package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import MODEL_DIR, QLP, ROOT

pytestmark = pytest.mark.model


def test_prepare_model_is_idempotent() -> None:
    before = {p.name: p.stat().st_mtime_ns for p in MODEL_DIR.iterdir()}
    out = subprocess.run(
        [str(QLP), "prepare-model", "--out", str(MODEL_DIR)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "already present" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in MODEL_DIR.iterdir()} == before


def test_base_model_is_plain_float32_safetensors_loadable_without_gguf() -> None:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (MODEL_DIR / "model.safetensors").is_file() and (MODEL_DIR / "chat_template.jinja").is_file()
    script = (
        "import sys; sys.modules['gguf'] = None\n"  # any import of gguf now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(MODEL_DIR)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(MODEL_DIR)!r})\n"
        "assert t.chat_template and getattr(m, 'hf_quantizer', None) is None\n"
        "print(m.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "torch.float32"
