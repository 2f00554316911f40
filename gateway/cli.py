"""The `qlp` console script: one entry point, one subcommand per component.

Subcommands are imported lazily so that `qlp gateway` never imports torch and a missing extra only
fails the subcommand that needs it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

# name -> ("module:function", help). Each function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("gateway.fleet:main", "start the local fleet (Redis, model servers, gateway) in the foreground"),
    "gateway": ("gateway.server:main", "run the gateway (uvicorn, one process per worker)"),
    "prepare-model": ("services.base_model.prepare:main", "convert the GGUF base model to safetensors"),
    "keys": ("gateway.metering.keys_cli:main", "create, list and revoke API keys"),
    "ledger": ("gateway.metering.ledger_cli:main", "read the cost ledger"),
    "capture": ("gateway.capture.cli:main", "export captured exchanges as the trainer's JSONL"),
    "report": ("gateway.report.cli:main", "rollout report: quality, latency, cost and savings per arm"),
    "train": ("trainer.cli:main", "build datasets, train, evaluate, export and publish adapters"),
    "loop": ("trainer.loop:main", "captured successes -> train -> evaluate -> canary -> report, in one go"),
}


def _usage() -> str:
    lines = ["usage: qlp <command> [args...]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"qlp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func: Callable[[list[str]], int | None] = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
