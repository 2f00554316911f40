"""The trainer's exception tree. The CLI turns each into one line on stderr and an exit code; nothing else
is caught there, so a bug still shows its traceback.

    TrainerError                 exit 2
    ├── ConfigError              a config field (YAML or flag) is invalid
    ├── DataError                a data file is unusable; names the file and, where it applies, the line
    ├── CheckpointError          a checkpoint is missing, corrupt or belongs to another run
    ├── ExportError              AdaLoRA -> LoRA export failed or its output is not equivalent
    └── PublishError             writing the adapter folder or loading it into a server failed
    TrainingInterrupted          exit 130: SIGINT/SIGTERM, stopped at a step boundary after a checkpoint
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "PublishError",
    "TrainerError",
    "TrainingInterrupted",
]


class TrainerError(Exception):
    exit_code = 2


class ConfigError(TrainerError):
    pass


class DataError(TrainerError):
    """Bad input data. `str()` reads `path:line: message` (or `path: message`) like a compiler error."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class CheckpointError(TrainerError):
    pass


class ExportError(TrainerError):
    pass


class PublishError(TrainerError):
    pass


class TrainingInterrupted(Exception):  # a stop, not a failure: not a TrainerError
    """Training stopped on a signal after saving a checkpoint; rerun the same command to resume."""

    exit_code = 130

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"interrupted after step {step}; checkpoint: {checkpoint}")
