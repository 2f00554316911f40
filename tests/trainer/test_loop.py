"""`qlp loop` end to end on this machine: developer traffic through a real gateway (metering, capture on)
into a real model server with the real small base model, success feedback through the feedback route, then
the loop: export -> AdaLoRA fit -> evaluate against the current arm -> publish as a canary -> report. New
workflows then land on the canary at its weight. Plus the refusals, which need no training."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.capture.capture import stream_key
from gateway.feedback.keys import request_key
from tests.fakes.gateway import RunningGateway, start_gateway
from tests.metered import ADMIN_KEY, create_key, eventually, run
from tests.trainer.conftest import BASE_NAME, MODEL_DIR, ModelServer, tiny_overrides
from trainer.loop import Refused, current_arm, gate, main, next_version

AGENT, WEIGHT = "developer", 30
PROMPTS = [
    f"Write a Python function {name}_{k}(x) that returns x {op} {k}."
    for name, op in (("add", "+"), ("sub", "-"))
    for k in range(2, 9)
]  # 14 distinct tasks


def _loop_config(tmp_path: Path) -> Path:
    """The tiny, fast run of tests/trainer/conftest.py (6 steps, q/v, rank 4 -> 2, one thread), as a YAML
    file the loop reads like config/train/developer.yaml; `data` comes from the capture export."""
    cfg = tiny_overrides(tmp_path / "unused.jsonl", tmp_path / "run")
    for k in ("data", "output_dir", "name", "version"):
        cfg.pop(k)
    cfg.update(agent=AGENT, name=AGENT, max_steps=6, pass_at_1=False, human_eval_seed=False)
    path = tmp_path / "developer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fleet_gateway(
    model_server: ModelServer, redis_url: str, pricing_file: Path, tmp_path: Path
) -> Iterator[RunningGateway]:
    """A metered gateway whose T0 is the real model server, capturing T0 developer traffic."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin_key").write_text(ADMIN_KEY)
    config = {
        "default_tier": "T0",
        "health_interval": 60,
        "capture": {"targets": {"T0": [AGENT]}},
        "tiers": {
            "T0": {
                "model": BASE_NAME,
                "aliases": ["qlp-t0"],
                "backends": [{"name": "t0-local", "base_url": f"{model_server.url}/v1"}],
            }
        },
    }
    gw = start_gateway(config, tmp_path, metering=True, redis_url=redis_url, pricing=pricing_file)
    yield gw
    gw.stop()


def _ask(client: openai.OpenAI, prompt: str, workflow: str, max_tokens: int) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="qlp-t0",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_headers={"X-QLP-Agent": AGENT, "X-QLP-Workflow-Id": workflow},
    )
    raw.parse()
    return raw.headers["x-qlp-backend"]


def _admin(gw: RunningGateway, path: str) -> Any:
    r = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def _served(model_server: ModelServer) -> set[str]:
    return {m["id"] for m in httpx.get(f"{model_server.url}/v1/models", timeout=10).json()["data"]}


def _xlen(url: str) -> int:
    n: int = run(lambda r: r.xlen(stream_key(AGENT)), url)
    return n


def test_loop_turns_captured_successes_into_a_canary_that_serves_its_share_of_new_workflows(
    fleet_gateway: RunningGateway,
    model_server: ModelServer,
    adapters_root: Path,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = fleet_gateway
    key, _ = create_key(redis_url, "acme")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=120)

    # Production traffic: one workflow per task, short answers; the orchestrator reports success.
    workflows = [f"wf-train-{i}" for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(4) as pool:
        backends = list(pool.map(lambda pw: _ask(client, pw[0], pw[1], 24), zip(PROMPTS, workflows, strict=True)))
    assert set(backends) == {f"t0-local/{BASE_NAME}"}

    def feedback(wf: str) -> bool:  # 404 until the gateway has booked the workflow's charge
        r = httpx.post(
            f"{gw.url}/v1/feedback",
            json={"workflow_id": wf, "outcome": "success"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert r.status_code in (200, 404), r.text
        return r.status_code == 200

    for wf in workflows:
        eventually(lambda wf=wf: feedback(wf), what=f"feedback on {wf} to be accepted")
    eventually(lambda: _xlen(redis_url) == len(PROMPTS), what="every exchange to be captured")

    common = [
        "--agent",
        AGENT,
        "--config",
        str(_loop_config(tmp_path)),
        "--output-dir",
        str(tmp_path / "run"),
        "--base-model",
        str(MODEL_DIR),
        "--adapters-root",
        str(adapters_root),
        "--servers",
        model_server.url,
        "--gateway",
        gw.url,
        "--tier",
        "T0",
        "--admin-key-file",
        str(tmp_path / "secrets" / "admin_key"),
        "--redis-url",
        redis_url,
        "--weight",
        str(WEIGHT),
        "--min-examples",
        "10",
    ]
    # Whatever six steps on the model's own greedy answers do to the held-out loss, the gate must not block
    # the demonstration here (it is checked on its own below).
    argv = [*common, "--max-regression", "10"]

    # --dry-run: everything up to the gate, and nothing published, loaded or routed.
    started = time.monotonic()
    assert main([*argv, "--dry-run"]) == 0
    dry_seconds = time.monotonic() - started
    dry = capsys.readouterr().out
    assert '"dry_run"' in dry and '"capture": {"path"' in dry
    assert not (adapters_root / AGENT).exists()
    assert f"{AGENT}-v1" not in _served(model_server)
    assert _admin(gw, "/v1/admin/rollouts")["data"] == []

    started = time.monotonic()
    assert main(argv) == 0  # resumes the dry run's finished training: same data, same config
    seconds = time.monotonic() - started
    out = capsys.readouterr().out
    steps = {k: v for line in out.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    assert steps["capture"]["successes"] == len(PROMPTS)
    assert steps["gate"]["passed"] is True and steps["gate"]["current_arm"] == "baseline"
    assert "held-out loss" in out and f"new ({AGENT}-v1)" in out  # the comparison table

    # The folder, with its card.
    dest = adapters_root / AGENT / "v1"
    card = json.loads((dest / "card.json").read_text())
    assert (card["name"], card["version"], card["agent"]) == (AGENT, "v1", AGENT)
    assert card["loop"]["served_as"] == f"{AGENT}-v1" and card["loop"]["weight"] == WEIGHT
    assert card["evaluation"]["gate"]["passed"] is True
    assert card["dataset"]["counts"]["train"] + card["dataset"]["counts"]["eval"] == len(PROMPTS)
    assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # Served side by side under <name>-<version>, and routed as a canary at the weight.
    assert f"{AGENT}-v1" in _served(model_server)
    [rollout] = _admin(gw, "/v1/admin/rollouts")["data"]
    assert (rollout["tier"], rollout["agent"]) == ("T0", AGENT)
    assert [(a["name"], a["weight"], a["adapter"]) for a in rollout["arms"]] == [
        ("baseline", 100 - WEIGHT, None),
        (f"{AGENT}-v1", WEIGHT, f"{AGENT}-v1"),
    ]

    # The report was printed at the end (rendered from the gateway's /v1/report).
    assert steps["report"] == {"tier": "T0", "agent": AGENT, "from": gw.url}
    report = out.split('{"report"', 1)[1]
    assert "TIER" in report and "SUCCESS" in report and f"{len(PROMPTS)} requests" in report

    # New workflows: some land on the canary, the rest on the baseline (arms are a hash of the workflow id:
    # fixed ids give a fixed split).
    with ThreadPoolExecutor(4) as pool:
        landed = Counter(pool.map(lambda i: _ask(client, "Say hi.", f"wf-new-{i}", 1), range(24)))
    assert set(landed) == {f"t0-local/{BASE_NAME}", f"t0-local/{AGENT}-v1"}, landed

    # Promote v1 to all the traffic; the next loop compares against v1 itself (its published folder, on the
    # same held-out split), takes v2, serves it beside v1 and splits v1's share with it.
    r = httpx.post(
        f"{gw.url}/v1/admin/routes",
        json={"tier": "T0", "agent": AGENT, "adapter": f"{AGENT}-v1"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert (
        main([*common, "--max-regression", "0.01"]) == 0
    )  # same data: the same weights as v1, so no regression at all
    steps = {
        k: v
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("{")
        for k, v in json.loads(line).items()
    }
    assert steps["gate"]["current_arm"] == f"{AGENT}-v1" and steps["gate"]["passed"] is True
    assert steps["gate"]["current_loss"] == steps["gate"]["new_loss"]
    assert (adapters_root / AGENT / "v2" / "card.json").is_file()
    assert {f"{AGENT}-v1", f"{AGENT}-v2"} <= _served(model_server)
    [rollout] = _admin(gw, "/v1/admin/rollouts")["data"]
    assert [(a["name"], a["weight"]) for a in rollout["arms"]] == [
        (f"{AGENT}-v1", 100 - WEIGHT),
        (f"{AGENT}-v2", WEIGHT),
    ]
    with capsys.disabled():  # the figures, for whoever runs this with -s
        print(
            f"\nqlp loop wall time: dry run (trains) {dry_seconds:.1f} s, publishing run (resumes) "
            f"{seconds:.1f} s; new workflows per backend: {dict(landed)}"
        )


# ---- refusals and decisions, no training ----


def _capture(url: str, outcomes: list[str | None]) -> None:
    """Captured developer exchanges as the gateway writes them, with their feedback."""

    async def write(r: Any) -> None:
        for i, outcome in enumerate(outcomes):
            rec = {
                "request_id": f"req-{i}",
                "tenant": "acme",
                "tier": "T0",
                "agent": AGENT,
                "workflow": None,
                "messages": [{"role": "user", "content": f"task {i}"}],
                "response": f"answer {i}",
            }
            await r.xadd(stream_key(AGENT), {"r": json.dumps(rec)})
            if outcome:
                await r.set(request_key("acme", f"req-{i}"), json.dumps({"outcome": outcome}))

    run(write, url)


def test_too_few_captured_successes_refuse_to_train(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _capture(redis_url, ["success", "success", "failure", None])
    rc = main(
        [
            "--agent",
            AGENT,
            "--config",
            str(_loop_config(tmp_path)),
            "--output-dir",
            str(tmp_path / "run"),
            "--redis-url",
            redis_url,
            "--min-examples",
            "3",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "only 2 captured successes of agent 'developer'; --min-examples is 3: not training" in err
    assert not (tmp_path / "run" / "dataset").exists()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--weight", "0"], "--weight must be in (0, 100]"),
        (["--weight", "150"], "--weight must be in (0, 100]"),
        (["--max-regression", "-0.1"], "--max-regression must be >= 0"),
        (["--gateway", "http://127.0.0.1:9"], "needs the admin key"),
        (["--gateway", "http://127.0.0.1:9", "--admin-key-file", "KEY"], "without --servers"),
    ],
)
def test_bad_flags_are_refused_before_any_work(
    flags: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QLP_ADMIN_KEY", raising=False)
    (tmp_path / "KEY").write_text(ADMIN_KEY)
    flags = [str(tmp_path / f) if f == "KEY" else f for f in flags]
    # Redis on a closed port: a refusal that came after the export would fail differently.
    rc = main(
        [
            "--agent",
            AGENT,
            "--config",
            str(_loop_config(tmp_path)),
            "--output-dir",
            str(tmp_path / "run"),
            "--redis-url",
            "redis://127.0.0.1:9/0",
            *flags,
        ]
    )
    assert rc == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "run" / "capture.jsonl").exists()


def test_the_gate_blocks_a_regression_beyond_the_allowed_fraction() -> None:
    assert gate(1.0, 1.02, 0.02).passed
    assert gate(1.0, 0.5, 0.0).passed
    blocked = gate(1.0, 1.03, 0.02)
    assert not blocked.passed and blocked.as_dict()["regression"] == pytest.approx(0.03)


def _published(root: Path, name: str, version: str) -> Path:
    d = root / name / version
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


def test_the_current_arm_is_the_heaviest_and_its_published_adapter_is_what_is_compared(tmp_path: Path) -> None:
    folder = _published(tmp_path, AGENT, "v3")
    rollouts = [
        {
            "tier": "T0",
            "agent": AGENT,
            "arms": [
                {"name": "baseline", "weight": 20, "adapter": None},
                {"name": "v3", "weight": 70, "adapter": "developer-v3"},
                {"name": "v4", "weight": 10, "adapter": "developer-v4"},
            ],
        }
    ]
    arm = current_arm(rollouts, "T0", AGENT, tmp_path, AGENT)
    assert (arm.name, arm.adapter, arm.folder) == ("v3", "developer-v3", folder)
    # No rollout for the agent: the tier's "*" rollout, else the base model.
    star = [{"tier": "T0", "agent": "*", "arms": [{"name": "gpt4", "weight": 1, "tier": "T3"}]}]
    assert current_arm(star, "T0", AGENT, tmp_path, AGENT).folder is None
    assert "T3" in current_arm(star, "T0", AGENT, tmp_path, AGENT).note
    assert current_arm([], "T0", AGENT, tmp_path, AGENT).name == "baseline"


def test_a_current_arm_whose_adapter_folder_is_missing_is_refused_not_guessed(tmp_path: Path) -> None:
    rollouts = [{"tier": "T0", "agent": AGENT, "arms": [{"name": "x", "weight": 1, "adapter": "developer-v9"}]}]
    with pytest.raises(Refused, match="no published folder"):
        current_arm(rollouts, "T0", AGENT, tmp_path, AGENT)


def test_versions_count_up_from_the_highest_published(tmp_path: Path) -> None:
    assert next_version(tmp_path / AGENT) == "v1"
    for v in ("v1", "v2", "v10", "2025-01-01"):
        _published(tmp_path, AGENT, v)
    assert next_version(tmp_path / AGENT) == "v11"
