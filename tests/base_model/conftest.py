"""Where the prepared base model lives, and the `qlp` that prepares it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "base"
QLP = Path(sys.executable).with_name("qlp")
