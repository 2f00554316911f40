"""The metered gateway of another git revision against this checkout's, side by side in one run.

    .venv/bin/python -m bench.revisions REV          (e.g. a commit before a change to the request path)

Three gateways against one nginx mock and one Redis (bench_metering's set-up): metering off (this
checkout), metering on at REV (a temporary `git worktree`), metering on here. Rounds of 2 s, in turn
forward and backward, so that a machine whose speed drifts favours no one; prints each one's on/off ratio
(median of the rounds), CPU per request, and the median of the rounds' here/REV ratios. Not part of
`make bench`: a tool for "did this change make it faster", measured the only way this machine allows.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import bench_metering as bm
from bench.harness import ROOT, gateway, median, wrk

ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "16"))


@contextlib.contextmanager
def _worktree(rev: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qlp-rev-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(d), rev], check=True)
    try:
        yield d
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(d)], check=False)


@contextlib.contextmanager
def _cwd(d: Path) -> Iterator[None]:
    """The gateway is started with `python -m`: the working directory decides which code runs."""
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    rev = argv[0]
    bm.DURATION = 2
    with _worktree(rev) as tree, bm.metered_setup("qlp-bench-rev-") as m, contextlib.ExitStack() as stack:
        auth = {"QLP_BENCH_KEY": m.key}
        urls = {"off": stack.enter_context(gateway(m.upstream, env={"QLP_METERING": "false"}))}
        with _cwd(tree):
            urls[rev] = stack.enter_context(gateway(m.upstream, env=m.env))
        urls["here"] = stack.enter_context(gateway(m.upstream, env=m.env))
        pids = {name: bm.gateway_pid(url) for name, url in urls.items()}
        for url in urls.values():  # warm-up
            wrk(url + "/v1/chat/completions", 32, 2, env=auth)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        for i in range(ROUNDS):
            for name in list(urls) if i % 2 == 0 else list(urls)[::-1]:
                metered = name != "off"
                runs[name].append(
                    bm._measured(
                        urls[name] + "/v1/chat/completions",
                        32,
                        [pids[name], *([m.redis_pid] if metered else [])],
                        auth if metered else None,
                    )
                )
    off_cpu = median([r["cpu0"] for r in runs["off"]]) * 1e6
    for name in (rev, "here"):
        ratio = median([a["rps"] / o["rps"] for a, o in zip(runs[name], runs["off"], strict=True)])
        print(
            f"{name}: on = {ratio:.0%} of off (median of {ROUNDS} rounds); CPU per request: gateway "
            f"{median([r['cpu0'] for r in runs[name]]) * 1e6:.0f} us (off {off_cpu:.0f} us), "
            f"Redis {median([r['cpu1'] for r in runs[name]]) * 1e6:.0f} us"
        )
    gain = median([h["rps"] / r["rps"] for h, r in zip(runs["here"], runs[rev], strict=True)])
    print(f"here / {rev}, requests/s, median of the rounds' ratios: {gain:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
