"""The batch trainer: captured agent traffic -> dataset -> AdaLoRA fine-tune -> evaluation -> plain LoRA
export for vLLM -> publish into the fleet.

    qlp train run --config config/train/developer.yaml        # the whole pipeline
    qlp train dataset|fit|eval|export|publish ...             # one stage at a time

Nothing is imported here: `qlp train --help` and the data stage must not pay for importing torch.
See docs/trainer.md.
"""
