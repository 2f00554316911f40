"""PNG plots of the benchmark results in bench/results/ (the JSON files the benchmarks write).

    bench/.venv-litellm/bin/python bench/plot.py bench/results [NAME...]

Runs with a bench-only interpreter that has matplotlib (bench/.venv-litellm; bench_litellm creates it), so
the project never depends on matplotlib; imports nothing from the project. NAME: bench_litellm,
bench_scale (default: every result found). The benchmarks call it after writing results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OURS, THEIRS, BASE = "#1f6feb", "#d1242f", "#8b949e"


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], colors: list[str], fmt: str) -> None:
    n = len(series)
    width = 0.8 / n
    for i, ((label, values), color) in enumerate(zip(series.items(), colors, strict=True)):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=color)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8, loc="upper left")


def _headroom(ax: Any) -> None:
    """Room above the tallest bar for its label and the legend."""
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * (8 if ax.get_yscale() in ("log", "symlog") else 1.25))


def plot_litellm(d: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    conns = list(d["levels"])
    lv = d["levels"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    _bars(
        ax,
        conns,
        {
            "ours": [lv[c]["ours"]["rps"] for c in conns],
            f"LiteLLM {d['litellm_version']}": [lv[c]["litellm"]["rps"] for c in conns],
        },
        [OURS, THEIRS],
        "{:,.0f}",
    )
    ax.set_yscale("log")
    _headroom(ax)
    ax.set_title(
        f"requests/s (log scale); 32 connections: {lv['32']['ratio']['rps']:.0f}x"
        if "32" in lv
        else "requests/s (log scale)"
    )
    ax.set_xlabel("connections")
    ax = axes[1]
    _bars(
        ax,
        conns,
        {
            "ours": [lv[c]["ours"]["added_p50"] * 1e3 for c in conns],
            "LiteLLM": [lv[c]["litellm"]["added_p50"] * 1e3 for c in conns],
        },
        [OURS, THEIRS],
        "{:,.1f}",
    )
    ax.set_yscale("symlog", linthresh=1)
    _headroom(ax)
    ax.set_title("added latency p50, ms (vs the mock alone)")
    ax.set_xlabel("connections")
    ax = axes[2]
    _bars(
        ax,
        conns,
        {
            "ours": [lv[c]["ours"]["cpu_per_req"] * 1e6 for c in conns],
            "LiteLLM": [lv[c]["litellm"]["cpu_per_req"] * 1e6 for c in conns],
        },
        [OURS, THEIRS],
        "{:,.0f}",
    )
    ax.set_yscale("log")
    _headroom(ax)
    ax.set_title("CPU per request, us (log scale)")
    ax.set_xlabel("connections")
    fig.suptitle(
        f"Gateway vs LiteLLM proxy, one worker each; RSS {d['rss_mb']['ours']:.0f} vs "
        f"{d['rss_mb']['litellm']:.0f} MiB. {d['machine']}",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "bench_litellm.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_scale(d: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    sc, st = d["scaling"]["workers"], d["streaming"]
    workers = list(sc)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    colors = [OURS, "#54aeff", "#0a3069", BASE]
    _bars(
        ax,
        workers,
        {f"{c} connections": [sc[w][str(c)]["rps"] for w in workers] for c in d["connections"]},
        colors[: len(d["connections"])],
        "{:,.0f}",
    )
    _headroom(ax)
    ax.set_title("requests/s by gateway workers (metering on)")
    ax.set_xlabel(f"workers (machine: {d['machine'].split(',')[0]})")
    ax = axes[1]
    labels = ["TTFT p50", "TTFT p99", "chunk gap p50", "chunk gap p99"]
    fields = ["ttfb_p50", "ttfb_p99", "gap_p50", "gap_p99"]
    _bars(
        ax,
        labels,
        {
            "mock alone": [st["direct"][f] * 1e3 for f in fields],
            "through the gateway": [st["gateway"][f] * 1e3 for f in fields],
        },
        [BASE, OURS],
        "{:,.1f}",
    )
    _headroom(ax)
    ax.set_title(f"{st['streams']:,} concurrent SSE streams, ms; dropped {st['dropped']:.0f}")
    fig.suptitle(d["machine"], fontsize=9)
    fig.tight_layout()
    path = out / "bench_scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


PLOTS = {"bench_litellm": plot_litellm, "bench_scale": plot_scale}


def main(argv: list[str]) -> int:
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed in this interpreter (use bench/.venv-litellm/bin/python)")
        return 0
    matplotlib.use("Agg")
    folder = Path(argv[0]) if argv else Path(__file__).parent / "results"
    names = argv[1:] or [n for n in PLOTS if (folder / f"{n}.json").exists()]
    for name in names:
        path = folder / f"{name}.json"
        if name not in PLOTS or not path.exists():
            print(f"plots: no results for {name}")
            continue
        for png in PLOTS[name](json.loads(path.read_text()), folder):
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
