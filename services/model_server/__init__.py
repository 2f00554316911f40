"""The CPU/GPU reference model server: vLLM's OpenAI API and LoRA endpoints on transformers.

Run it with `qlp model-server` (cli.py); `qlp prepare-model` (prepare.py) builds the base model folder.
See docs/model_server.md. Nothing here imports the gateway, and importing this package loads no torch.
"""
