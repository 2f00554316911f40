"""`make bench`: run every benchmark under bench/ and print its figures.

Each benchmark is a module in this folder with a `main(argv) -> int`. Select some with
`python -m bench NAME...`; default is all of them.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = argv or sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    rc = 0
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        print(f"\n===== {name} =====", flush=True)
        rc |= int(mod.main([]) or 0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
