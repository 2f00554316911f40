"""The learning loop's proof of worth: does an adapter trained from captured traffic lift task success?

    make proof                                    # = python -m bench bench_proof (tens of minutes on 2 cores)
    QLP_PROOF_SCALE=smoke python -m bench bench_proof   # a few tasks, a few steps: the pipeline only

Everything goes through the product, on loopback:

1. The task family `signature-json` (trainer/tasks.py: describe a standard-library function's signature as
   JSON, graded exactly by `ast`), split by hash into teach / held-out / A-B tasks that never overlap.
2. Teaching traffic: a scripted orchestrator sends the teach tasks to T3 through a metered gateway with
   capture on. T3 is a loopback OpenAI-compatible server that answers with the reference solution (it
   stands in for GPT-4 as the teacher: said plainly, no GPT-4 is called); its usage is the base
   tokenizer's count of prompt and reply. The orchestrator grades every reply with the family's check and
   posts the outcome to `POST /v1/feedback`.
3. `qlp loop` for each method (AdaLoRA first, then plain LoRA at r = AdaLoRA's target_r: the same final
   rank budget, the same data and schedule): capture export, fit, export, evaluation on its held-out split
   with task success, the gate (task success and loss), and for the first method the canary at 50%.
4. Held-out proof: every held-out task, greedy, straight to vLLM, as the base model and as each adapter;
   success rate with its 95% Wilson interval.
5. A/B on fresh tasks: each task its own workflow on T0 through the gateway, the rollout's arms (base vs
   the canary) chosen by the gateway, outcomes posted as feedback; then `GET /v1/report` for T0 and T3:
   success rate per arm with intervals, cost per task, and the all-GPT-4 counterfactual.

Real Redis, real vLLM (one engine, services/vllm/cpu.yaml), the real gateway and trainer processes, the
official `openai` client. Writes bench/results/bench_proof.{json,md} and prints the tables.
Knobs: QLP_PROOF_SCALE (full | smoke), QLP_PROOF_TEACH / _HELDOUT / _AB (task counts), QLP_PROOF_EPOCHS,
QLP_PROOF_METHODS (adalora,lora), QLP_PROOF_CONCURRENCY (8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "base"
BASE_NAME = "SmolLM2-135M-Instruct"
AGENT = "signature"
FAMILY = "signature-json"
SPLIT_SALT = "qlp-proof-v1"
ADMIN_KEY = "qlp-proof-admin-key-0123456789abcdef"


@dataclasses.dataclass(frozen=True)
class Scale:
    teach: int
    heldout: int
    ab: int
    epochs: int
    max_steps: int | None
    eval_max_tasks: int
    methods: tuple[str, ...]
    concurrency: int
    # The gate of the loop: the full proof publishes only an adapter at least as good as the base model; the
    # smoke run checks the pipeline, not the lift, so its gate is open.
    max_success_drop: float
    max_regression: float

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Scale:
        e = os.environ if env is None else env
        smoke = e.get("QLP_PROOF_SCALE", "full") == "smoke"
        return cls(
            teach=int(e.get("QLP_PROOF_TEACH", 16 if smoke else 480)),
            heldout=int(e.get("QLP_PROOF_HELDOUT", 8 if smoke else 150)),
            ab=int(e.get("QLP_PROOF_AB", 8 if smoke else 200)),
            epochs=int(e.get("QLP_PROOF_EPOCHS", 1 if smoke else 2)),
            max_steps=4 if smoke else None,
            eval_max_tasks=int(e.get("QLP_PROOF_EVAL_TASKS", 4 if smoke else 48)),
            methods=tuple(e.get("QLP_PROOF_METHODS", "adalora" if smoke else "adalora,lora").split(",")),
            concurrency=int(e.get("QLP_PROOF_CONCURRENCY", 8)),
            max_success_drop=1.0 if smoke else 0.0,
            max_regression=10.0 if smoke else 0.02,
        )


def split_tasks(scale: Scale) -> dict[str, list[Any]]:
    """teach / heldout / ab: disjoint, by hash of the task id; each in hash order, cut to its count."""
    from trainer.tasks import TASKS, split_of

    bounds = [("teach", 0.6), ("heldout", 0.8), ("ab", 1.0)]
    out: dict[str, list[Any]] = {"teach": [], "heldout": [], "ab": []}
    for t in sorted(TASKS[FAMILY].tasks(), key=lambda t: hashlib.sha256(t.task_id.encode()).hexdigest()):
        out[split_of(t.task_id, SPLIT_SALT, bounds)].append(t)
    want = {"teach": scale.teach, "heldout": scale.heldout, "ab": scale.ab}
    for name, n in want.items():
        if len(out[name]) < n:
            raise SystemExit(f"bench_proof: only {len(out[name])} {name} tasks, {n} asked")
        out[name] = out[name][:n]
    return out


# ---- the teacher: T3 on loopback, answering with the reference solution ------------------------------------


class Teacher:
    """An OpenAI-compatible chat server whose reply is the task family's reference answer."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from trainer.tasks import signature_expected

        tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
        answer, self.calls = signature_expected, 0
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                reply = json.dumps(answer(body["messages"]) or {})
                teacher.calls += 1
                usage = {
                    "prompt_tokens": len(tok.apply_chat_template(body["messages"], add_generation_prompt=True)),
                    "completion_tokens": len(tok(reply)["input_ids"]) + 1,
                }
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                out = json.dumps(
                    {
                        "id": f"chatcmpl-teacher-{teacher.calls}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "gpt-4"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "logprobs": None,
                                "message": {"role": "assistant", "content": reply, "refusal": None},
                            }
                        ],
                        "usage": usage,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the fleet -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fleet:
    gateway: str
    vllm: str
    redis_url: str
    key: str
    work: Path


def fleet_config(vllm_url: str, teacher_url: str) -> dict[str, Any]:
    return {
        "default_tier": "T0",
        "health_interval": 30,
        "capture": {"targets": {"T3": [AGENT]}},
        "tiers": {
            "T0": {
                "model": BASE_NAME,
                "aliases": ["qlp-t0"],
                "backends": [{"name": "t0-local", "base_url": f"{vllm_url}/v1", "health_path": "/health"}],
            },
            "T3": {
                "kind": "openai",
                "model": "gpt-4",
                "aliases": ["qlp-t3"],
                "backends": [{"name": "teacher", "base_url": teacher_url, "api_key_secret": "t3_api_key"}],
            },
        },
    }


@contextlib.contextmanager
def fleet(vllm_url: str | None = None, redis_url: str | None = None) -> Iterator[Fleet]:
    """Redis, vLLM (unless given), the teacher and a metered, capturing gateway with an admin key."""
    import asyncio

    from bench.bench_metering import redis_server
    from bench.harness import gateway
    from gateway.metering.keys import KeyStore

    work = Path(tempfile.mkdtemp(prefix="qlp-proof-"))
    with contextlib.ExitStack() as stack:
        if redis_url is None:
            redis_url, _ = stack.enter_context(redis_server())
        if vllm_url is None:
            from services.vllm import launch

            v = launch.start(
                MODEL_DIR,
                launch.free_port(),
                work / "vllm.log",
                timeout=300,
                progress=lambda s: print(f"bench_proof: {s}", flush=True),
            )
            stack.callback(launch.stop, v.proc)
            vllm_url = v.url
            print(f"bench_proof: vLLM ready in {v.started_s:.0f}s", flush=True)
        teacher = Teacher()
        stack.callback(teacher.close)

        async def create_key() -> str:
            from redis.asyncio import Redis

            r = Redis.from_url(redis_url)
            try:
                return (await KeyStore(r).create("proof"))[0]
            finally:
                await r.aclose()

        key = asyncio.run(create_key())
        env = {
            "QLP_METERING": "true",
            "QLP_REDIS_URL": redis_url,
            "QLP_PRICING": str(ROOT / "config/pricing.yaml"),
            "QLP_SPOOL_PATH": str(work / "spool.jsonl"),
            "QLP_ADMIN_KEY": ADMIN_KEY,
            "QLP_T3_API_KEY": "teacher",
        }
        gw = stack.enter_context(gateway("", env=env, config=fleet_config(vllm_url, teacher.url)))
        yield Fleet(gw, vllm_url, redis_url, key, work)


# ---- the orchestrator ------------------------------------------------------------------------------------------


def _bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True, file=sys.stderr)


def orchestrate(f: Fleet, tasks: list[Any], tier: str, prefix: str, concurrency: int) -> list[bool]:
    """One workflow per task on `tier`; every reply graded and its outcome posted as workflow feedback."""
    import httpx
    import openai

    from trainer.tasks import TASKS

    check = TASKS[FAMILY].check
    client = openai.OpenAI(base_url=f"{f.gateway}/v1", api_key=f.key, max_retries=2, timeout=600)
    http = httpx.Client(timeout=30)

    def one(i: int) -> bool:
        task, wf = tasks[i], f"{prefix}-{i}"
        r = client.chat.completions.create(
            model=f"qlp-{tier.lower()}",
            messages=task.chat(),
            max_tokens=96,
            temperature=0,
            extra_headers={"X-QLP-Tier": tier, "X-QLP-Agent": AGENT, "X-QLP-Workflow-Id": wf},
        )
        ok = check(task.chat(), r.choices[0].message.content or "")
        deadline = time.monotonic() + 30
        while True:  # 404 until the gateway has booked the request
            fb = http.post(
                f"{f.gateway}/v1/feedback",
                headers={"Authorization": f"Bearer {f.key}"},
                json={"workflow_id": wf, "outcome": "success" if ok else "failure"},
            )
            if fb.status_code == 200 or time.monotonic() > deadline:
                fb.raise_for_status()
                return ok
            time.sleep(0.1)

    bar = _bar(len(tasks), f"{prefix} via {tier}")
    out: list[bool] = []
    with ThreadPoolExecutor(concurrency) as pool:
        for ok in pool.map(one, range(len(tasks))):
            out.append(ok)
            bar.update(1)
    bar.close()
    http.close()
    return out


def captured(f: Fleet) -> int:
    import redis

    from gateway.capture.capture import stream_key

    r = redis.Redis.from_url(f.redis_url)
    try:
        return int(r.xlen(stream_key(AGENT)))
    finally:
        r.close()


def train_config(scale: Scale, method: str) -> dict[str, Any]:
    """The proof's trainer config (config/train/signature.yaml, with the scale's counts)."""
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "config/train/signature.yaml").read_text())
    cfg.update(
        method=method,
        name=f"{AGENT}-{method}",
        epochs=scale.epochs,
        eval_max_tasks=scale.eval_max_tasks,
        base_model=str(MODEL_DIR),
    )
    if scale.max_steps is not None:
        cfg["max_steps"] = scale.max_steps
        cfg["tinit"], cfg["tfinal"], cfg["tinit_ratio"], cfg["tfinal_ratio"], cfg["deltaT"] = 1, 1, None, None, 1
    return cfg


def run_loop(f: Fleet, scale: Scale, method: str, publish: bool) -> dict[str, Any]:
    """`qlp loop` as a user runs it; returns its JSON step lines and exit status."""
    cfg_file = f.work / f"{method}.yaml"
    cfg_file.write_text(yaml.safe_dump(train_config(scale, method)))
    (f.work / "admin_key").write_text(ADMIN_KEY)
    qlp = Path(sys.executable).parent / "qlp"
    argv = [
        str(qlp),
        "loop",
        "--agent",
        AGENT,
        "--config",
        str(cfg_file),
        "--output-dir",
        str(f.work / method),
        "--adapters-root",
        str(f.work / "adapters"),
        "--servers",
        f.vllm,
        "--tier",
        "T0",
        "--redis-url",
        f.redis_url,
        "--min-examples",
        str(min(10, scale.teach)),
        "--weight",
        "50",
        "--max-success-drop",
        str(scale.max_success_drop),
        "--max-regression",
        str(scale.max_regression),
    ]
    argv += ["--gateway", f.gateway, "--admin-key-file", str(f.work / "admin_key")] if publish else ["--dry-run"]
    t0 = time.monotonic()
    proc = subprocess.run(
        argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    steps: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        print(line, flush=True)
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and len(obj) == 1:
                steps.update(obj)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"bench_proof: qlp loop ({method}) exited {proc.returncode}")
    evaluation = json.loads((f.work / method / "eval.json").read_text())
    train_result = json.loads((f.work / method / "train_result.json").read_text())
    return {
        "method": method,
        "exit": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "steps": steps,
        "task_success": {k: v for k, v in (evaluation.get("task_success") or {}).items() if k != "per_task"},
        "held_out_loss": evaluation["held_out_loss"],
        "gate": evaluation.get("gate"),
        "training": {
            k: train_result.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_s", "final_loss", "rank_pattern")
        },
        "lora": str(f.work / method / "lora"),
    }


def held_out(f: Fleet, tasks: list[Any], models: dict[str, str], concurrency: int) -> dict[str, Any]:
    """Each held-out task, greedy, straight to vLLM, as each model: success rate and 95% interval."""
    import openai

    from gateway.report.compute import wilson
    from trainer.tasks import TASKS

    check = TASKS[FAMILY].check
    client = openai.OpenAI(base_url=f"{f.vllm}/v1", api_key="unused", max_retries=2, timeout=600)
    out: dict[str, Any] = {}
    for label, model in models.items():

        def one(t: Any, model: str = model) -> bool:
            r = client.chat.completions.create(model=model, messages=t.chat(), max_tokens=96, temperature=0)
            return check(t.chat(), r.choices[0].message.content or "")

        bar = _bar(len(tasks), f"held-out as {label}")
        oks: list[bool] = []
        with ThreadPoolExecutor(concurrency) as pool:
            for ok in pool.map(one, tasks):
                oks.append(ok)
                bar.update(1)
        bar.close()
        lo, hi = wilson(sum(oks), len(oks)) or (0.0, 1.0)
        out[label] = {
            "model": model,
            "tasks": len(oks),
            "successes": sum(oks),
            "rate": sum(oks) / len(oks),
            "ci95": [round(lo, 4), round(hi, 4)],
        }
    return out


def report(f: Fleet, tier: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(
        f"{f.gateway}/v1/report",
        params={"tier": tier, "agent": AGENT},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    )
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def prove(scale: Scale, vllm_url: str | None = None, redis_url: str | None = None) -> dict[str, Any]:
    from trainer.publish import load_into_server

    tasks = split_tasks(scale)
    result: dict[str, Any] = {
        "family": FAMILY,
        "scale": dataclasses.asdict(scale),
        "tasks": {k: len(v) for k, v in tasks.items()},
    }
    t_start = time.monotonic()
    with fleet(vllm_url, redis_url) as f:
        teach = orchestrate(f, tasks["teach"], "T3", "teach", scale.concurrency)
        deadline = time.monotonic() + 60
        while captured(f) < len(teach) and time.monotonic() < deadline:
            time.sleep(0.2)
        result["teach"] = {"tasks": len(teach), "teacher_correct": sum(teach), "captured": captured(f)}
        loops = [run_loop(f, scale, m, publish=(i == 0)) for i, m in enumerate(scale.methods)]
        result["loops"] = loops
        models = {"base": BASE_NAME}
        for i, lp in enumerate(loops):
            if i == 0 and lp["exit"] == 0:  # the canary the loop published and loaded
                models[lp["method"]] = lp["steps"]["canary"]["adapter"]
            else:  # not published (a dry run, or gated): loaded beside the others for the comparison only
                name = f"{AGENT}-{lp['method']}-eval"
                load_into_server(f.vllm, name, lp["lora"])
                models[lp["method"]] = name
        result["held_out"] = held_out(f, tasks["heldout"], models, scale.concurrency)
        if loops and loops[0]["exit"] == 0:
            ab = orchestrate(f, tasks["ab"], "T0", "ab", scale.concurrency)
            result["ab"] = {"tasks": len(ab), "successes": sum(ab)}
        result["report"] = {"T0": report(f, "T0"), "T3": report(f, "T3")}
    result["seconds"] = round(time.monotonic() - t_start, 1)
    return result


def _usd(micros: int | None) -> str:
    return "-" if micros is None else f"${micros / 1e6:.6f}"


def tables(res: dict[str, Any]) -> str:
    lines = [
        f"# Learning-loop proof: {res['family']}",
        "",
        f"Tasks: {res['tasks']['teach']} teach (via T3, teacher correct {res['teach']['teacher_correct']}, "
        f"captured {res['teach']['captured']}), {res['tasks']['heldout']} held-out, {res['tasks']['ab']} A/B; "
        f"{res['seconds']:.0f} s end to end.",
        "",
        "| arm (held-out, greedy, direct to vLLM) | success | 95% interval |",
        "|---|---:|---|",
    ]
    for label, h in res["held_out"].items():
        lines.append(
            f"| {label} (`{h['model']}`) | {h['successes']}/{h['tasks']} = {h['rate']:.1%} | "
            f"{h['ci95'][0]:.1%} - {h['ci95'][1]:.1%} |"
        )
    lines += [
        "",
        "| method | steps | train tokens | train s | tok/s | loss base -> adapter | loop's eval success "
        "base -> adapter | gate | loop s |",
        "|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for lp in res["loops"]:
        tr, ts, lo = lp["training"], lp["task_success"], lp["held_out_loss"]
        lines.append(
            f"| {lp['method']} | {tr['steps']} | {tr['tokens']} | {tr['seconds']:.0f} | "
            f"{tr['tokens_per_s']:.0f} | {lo['base']:.4f} -> {lo['adapter']:.4f} | "
            f"{ts.get('base', 0):.3f} -> {ts.get('adapter', 0):.3f} ({ts.get('tasks')} tasks) | "
            f"{'passed' if (lp['gate'] or {}).get('passed') else 'gated'} | {lp['seconds']:.0f} |"
        )
    lines += [
        "",
        "| tier | arm | requests | success | 95% interval | cost / task | GPT-4 counterfactual / task |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for tier in ("T3", "T0"):
        for g in res["report"][tier]["data"]:
            ci, rate = g.get("success_ci95"), g.get("success_rate")
            rate_s = "-" if rate is None else f"{rate:.1%}"
            ci_s = "-" if not ci else f"{ci[0]:.1%} - {ci[1]:.1%}"
            lines.append(
                f"| {g['tier']} | {g['arm']} | {g['requests']} | {rate_s} | {ci_s} | "
                f"{_usd(g['cost_per_workflow_micros'])} | {_usd(g['counterfactual_per_request_micros'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from bench.harness import write_results

    if not (MODEL_DIR / "config.json").is_file():
        print("bench_proof: skipped: models/base is missing (make model)")
        return 0
    res = prove(Scale.from_env())
    out = tables(res)
    print(out)
    write_results("bench_proof", res, out)
    return 0
