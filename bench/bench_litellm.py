"""Our gateway against LiteLLM's proxy, side by side: same mock upstream, same load generator, same machine.

    python -m bench bench_litellm        (part of `make bench`)
    QLP_BENCH_SECONDS=2 QLP_BENCH_LITELLM_SECONDS=12 QLP_BENCH_ROUNDS=1 python -m bench bench_litellm

Both proxies run as one process (one worker) in front of the nginx mock (bench/mock), with the features a
user turns on for this job:
  * ours: API-key auth, tier routing over two weighted backends, Redis metering (admission with limits and
    budget reservation, idempotent ledger charge per request), Prometheus metrics;
  * LiteLLM (PyPI, its own venv bench/.venv-litellm, created here when missing): master-key auth, its router
    over two deployments, per-request cost from configured prices, the in-memory global budget and its
    Prometheus spend/token/request metrics: its spend tracking as far as it works without a database
    (config: bench/litellm/config.yaml.tmpl).
Per connection count (default 1, 32, 256) and round, wrk runs against the mock alone, ours, then LiteLLM
(interleaved), and the medians are reported: requests/s, added latency p50/p99 (proxy minus the mock alone
at the same connection count), CPU seconds per request of each proxy's process tree (utime+stime from
/proc, divided by the requests wrk completed) and resident memory after the runs, as ratios.
Target: ours >= 40x LiteLLM's requests/s at 32 connections.

Environment: QLP_BENCH_SECONDS (per wrk run against ours and the mock, default 8), QLP_BENCH_LITELLM_SECONDS
(per run against LiteLLM, default 30: at 256 connections each of its requests takes seconds, and a run must
be several of those long), QLP_BENCH_ROUNDS (default 2), QLP_BENCH_CONNECTIONS (default "1,32,256").
Results: bench/results/bench_litellm.{json,md,png}.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import (
    ROOT,
    cpu_seconds,
    ensure_venv,
    free_port,
    gateway,
    machine_note,
    median,
    pid_on_port,
    process,
    rss_mb,
    wait_http,
    write_results,
    wrk,
)

LITELLM_VERSION = "1.108.7"
# prometheus-client: LiteLLM's "prometheus" callback needs it and [proxy] does not bring it; matplotlib: the
# plots (bench/plot.py runs with this venv's python, so the project never depends on it).
REQUIREMENTS = [f"litellm[proxy]=={LITELLM_VERSION}", "prometheus-client==0.23.1", "matplotlib==3.11.2"]
VENV = ROOT / "bench" / ".venv-litellm"
ROUNDS = int(os.environ.get("QLP_BENCH_ROUNDS", "2"))
DURATION = int(os.environ.get("QLP_BENCH_SECONDS", "8"))
LITELLM_DURATION = int(os.environ.get("QLP_BENCH_LITELLM_SECONDS", "30"))
CONNECTIONS = [int(c) for c in os.environ.get("QLP_BENCH_CONNECTIONS", "1,32,256").split(",")]
WRK_TIMEOUT = 120  # seconds; wrk records no latency past its timeout (2 s by default), LiteLLM goes past that
GATEWAY_FEATURES = [
    "API-key auth (key in Redis, SHA-256)",
    "tier routing, 2 weighted backends",
    "Redis metering: admission (rpm/tpm windows, budget reservation) + idempotent ledger charge",
    "Prometheus metrics",
]
LITELLM_FEATURES = [
    "master_key auth",
    "router over 2 deployments",
    "per-request cost (model_info prices)",
    "in-memory global max_budget",
    "prometheus callback (spend, tokens, requests, latency)",
    "no database: virtual keys, per-key budgets/limits and spend logs are off",
]


def routed_config(upstream: str) -> dict[str, Any]:
    """One tier, two weighted backends at the same upstream: every request goes through the routing policy."""
    return {
        "default_tier": "T0",
        "health_interval": 30,
        "tiers": {
            "T0": {
                "model": "bench",
                "aliases": ["qlp-t0"],
                "backends": [
                    {"name": "mock-a", "base_url": upstream, "weight": 1},
                    {"name": "mock-b", "base_url": upstream, "weight": 1},
                ],
            }
        },
    }


def litellm_python() -> Path:
    return ensure_venv(VENV, REQUIREMENTS)


@contextlib.contextmanager
def litellm_proxy(upstream: str, master_key: str) -> Iterator[str]:
    """LiteLLM's proxy (one worker, no database) in front of `upstream`; yields its base URL."""
    litellm_python()
    d = Path(tempfile.mkdtemp(prefix="qlp-litellm-"))
    cfg = d / "config.yaml"
    tmpl = (ROOT / "bench" / "litellm" / "config.yaml.tmpl").read_text()
    cfg.write_text(tmpl.replace("{api_base}", upstream).replace("{master_key}", master_key))
    port = free_port()
    # No fetch of the price map from the network at start; errors only in its log.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    if os.environ.get("DATABASE_URL"):
        raise SystemExit("bench_litellm measures LiteLLM without a database: unset DATABASE_URL")
    with process(
        [
            str(VENV / "bin" / "litellm"),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
    ):
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=300)  # ~20 s on a busy 2-core machine
        yield f"http://127.0.0.1:{port}"
    shutil.rmtree(d, ignore_errors=True)


def root_pid(url: str) -> int:
    """The process that the bench started for the server at `url` (a session leader): its tree is the server."""
    return os.getsid(pid_on_port(int(url.rsplit(":", 1)[1])))


def measured(url: str, conns: int, duration: int, pid: int | None, env: dict[str, str]) -> dict[str, float]:
    """wrk figures plus CPU seconds per completed request of the process tree `pid`."""
    before = cpu_seconds(pid) if pid else 0.0
    r = wrk(url, conns, duration, env=env, timeout=WRK_TIMEOUT)
    if pid:
        r["cpu_per_req"] = (cpu_seconds(pid) - before) / max(r["requests"], 1.0)
    return r


def _med(runs: list[dict[str, float]], field: str) -> float:
    values = [r[field] for r in runs if field in r]
    return median(values) if values else float("nan")


def summarize(runs: dict[str, dict[int, list[dict[str, float]]]], rss: dict[str, float]) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    for c in CONNECTIONS:
        lv: dict[str, Any] = {}
        direct = runs["direct"][c]
        for side in ("ours", "litellm"):
            rs = runs[side][c]
            lv[side] = {
                "rps": _med(rs, "rps"),
                "p50": _med(rs, "p50"),
                "p99": _med(rs, "p99"),
                "added_p50": _med(rs, "p50") - _med(direct, "p50"),
                "added_p99": _med(rs, "p99") - _med(direct, "p99"),
                "cpu_per_req": _med(rs, "cpu_per_req"),
                "non2xx": sum(r["non2xx"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
            }
        lv["direct"] = {"rps": _med(direct, "rps"), "p50": _med(direct, "p50"), "p99": _med(direct, "p99")}
        o, t = lv["ours"], lv["litellm"]
        lv["ratio"] = {
            "rps": o["rps"] / t["rps"] if t["rps"] else float("inf"),
            "added_p50": t["added_p50"] / o["added_p50"] if o["added_p50"] > 0 else float("nan"),
            "added_p99": t["added_p99"] / o["added_p99"] if o["added_p99"] > 0 else float("nan"),
            "cpu_per_req": t["cpu_per_req"] / o["cpu_per_req"] if o["cpu_per_req"] else float("nan"),
        }
        levels[str(c)] = lv
    return {
        "levels": levels,
        "rss_mb": rss,
        "rss_ratio": rss["litellm"] / rss["ours"] if rss.get("ours") else float("nan"),
    }


def table(s: dict[str, Any], note: str) -> str:
    lines = [
        f"# Gateway vs LiteLLM {LITELLM_VERSION} (one worker each, nginx mock upstream)",
        "",
        f"Machine: {note}. Medians of {ROUNDS} interleaved rounds; wrk {DURATION} s per run "
        f"({LITELLM_DURATION} s against LiteLLM).",
        "",
        "| connections | ours req/s | LiteLLM req/s | x | ours added p50 / p99 | LiteLLM added p50 / p99 "
        "| ours CPU/req | LiteLLM CPU/req | x |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, lv in s["levels"].items():
        o, t, r = lv["ours"], lv["litellm"], lv["ratio"]
        lines.append(
            f"| {c} | {o['rps']:,.0f} | {t['rps']:,.1f} | {r['rps']:.0f}x "
            f"| {o['added_p50'] * 1e3:.2f} / {o['added_p99'] * 1e3:.2f} ms "
            f"| {t['added_p50'] * 1e3:.1f} / {t['added_p99'] * 1e3:.1f} ms "
            f"| {o['cpu_per_req'] * 1e6:,.0f} us | {t['cpu_per_req'] * 1e6:,.0f} us "
            f"| {r['cpu_per_req']:.0f}x |"
        )
    rss = s["rss_mb"]
    lines += [
        "",
        f"Resident memory after the runs: ours {rss['ours']:.0f} MiB, LiteLLM {rss['litellm']:.0f} MiB "
        f"({s['rss_ratio']:.1f}x).",
        "",
        "Ours: " + "; ".join(GATEWAY_FEATURES) + ".",
        "",
        "LiteLLM: " + "; ".join(LITELLM_FEATURES) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        litellm_python()
    except (RuntimeError, OSError) as exc:
        print(f"bench_litellm: skipped: could not install LiteLLM into {VENV.relative_to(ROOT)}: {exc}")
        return 0
    master = "sk-bench-" + secrets.token_hex(16)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        s: {c: [] for c in CONNECTIONS} for s in ("direct", "ours", "litellm")
    }
    # The same metered setup as bench_metering's (Redis of its own, prices, a key with every limit set).
    from bench.bench_metering import metered_setup

    with metered_setup("qlp-bench-metered-") as m:
        upstream, on_env, key = m.upstream, m.env, m.key
        with gateway(upstream, env=on_env, config=routed_config(upstream)) as gw, litellm_proxy(upstream, master) as ll:
            pids = {"ours": root_pid(gw), "litellm": root_pid(ll)}
            urls = {
                "direct": upstream + "/chat/completions",
                "ours": gw + "/v1/chat/completions",
                "litellm": ll + "/v1/chat/completions",
            }
            auth = {"ours": {"QLP_BENCH_KEY": key}, "litellm": {"QLP_BENCH_KEY": master}, "direct": {}}
            wrk(urls["ours"], 32, 2, env=auth["ours"])  # warm-up: connection pools, code paths
            wrk(urls["litellm"], 32, min(LITELLM_DURATION, 5), env=auth["litellm"], timeout=WRK_TIMEOUT)
            for _ in range(ROUNDS):
                for c in CONNECTIONS:
                    runs["direct"][c].append(measured(urls["direct"], c, DURATION, None, {}))
                    runs["ours"][c].append(measured(urls["ours"], c, DURATION, pids["ours"], auth["ours"]))
                    runs["litellm"][c].append(
                        measured(urls["litellm"], c, LITELLM_DURATION, pids["litellm"], auth["litellm"])
                    )
            rss = {"ours": rss_mb(pids["ours"]), "litellm": rss_mb(pids["litellm"])}
    s = summarize(runs, rss)
    note = machine_note()
    out = table(s, note)
    print(out)
    r32 = s["levels"].get("32", {}).get("ratio", {}).get("rps")
    if r32 is not None:
        print(
            f"32 connections: ours / LiteLLM = {r32:.0f}x requests/s ({'meets' if r32 >= 40 else 'MISSES'} "
            f"the 40x target)"
        )
    bad = {
        side: sum(lv[side]["non2xx"] + lv[side]["errors"] for lv in s["levels"].values())
        for side in ("ours", "litellm")
    }
    if any(bad.values()):
        print(f"non-2xx answers or socket errors: ours {bad['ours']:.0f}, LiteLLM {bad['litellm']:.0f}")
    write_results(
        "bench_litellm",
        {
            "machine": note,
            "litellm_version": LITELLM_VERSION,
            "rounds": ROUNDS,
            "seconds": DURATION,
            "litellm_seconds": LITELLM_DURATION,
            "connections": CONNECTIONS,
            "ours_features": GATEWAY_FEATURES,
            "litellm_features": LITELLM_FEATURES,
            **s,
            "runs": runs,
        },
        out,
    )
    return 0
