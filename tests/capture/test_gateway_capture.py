"""Capture through a real gateway (metering on, real Redis, the official openai client): what is captured,
what never is, and the export the trainer reads, with feedback outcomes joined."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml

from gateway.capture import cli
from gateway.capture.capture import stream_key
from gateway.feedback.keys import request_key, workflow_key
from tests.capture.conftest import CANARIES, planted
from tests.fakes.gateway import RunningGateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.metered import ADMIN_KEY, create_key, fleet
from tests.wait import eventually
from trainer.records import CaptureStats, read_capture

BACKEND_SECRET = "t0-backend-api-key-value-42"  # matches no pattern: only the literal secret list catches it


@pytest.fixture
def gw(metered: Callable[..., RunningGateway], upstreams: dict[str, FakeUpstream], tmp_path: Path) -> RunningGateway:
    """A gateway capturing developer exchanges on T0 only; T0's backend has an API key (a literal secret)."""
    cfg = fleet(upstreams, capture={"targets": {"T0": ["developer"]}, "maxlen": 100})
    cfg["tiers"]["T0"]["backends"][0]["api_key_secret"] = "t0_key"
    (tmp_path / "secrets").mkdir(exist_ok=True)
    (tmp_path / "secrets" / "t0_key").write_text(BACKEND_SECRET)
    return metered(cfg)


@pytest.fixture
def client(gw: RunningGateway, redis_url: str) -> openai.OpenAI:
    key, _ = create_key(redis_url, "acme")
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def r(redis_url: str) -> Any:
    with redis.Redis.from_url(redis_url) as c:
        yield c


def ask(
    client: openai.OpenAI,
    content: str = "hi",
    *,
    agent: str | None = "developer",
    tier: str = "T0",
    stream: bool = False,
    request_id: str | None = None,
    workflow: str | None = "wf-1",
) -> str:
    headers = {"X-QLP-Tier": tier}
    if agent:
        headers["X-QLP-Agent"] = agent
    if workflow:
        headers["X-QLP-Workflow-Id"] = workflow
    if request_id:
        headers["X-Request-Id"] = request_id
    messages: Any = [{"role": "system", "content": "You write code."}, {"role": "user", "content": content}]
    if stream:
        chunks = client.chat.completions.create(model="qlp-t0", messages=messages, stream=True, extra_headers=headers)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    resp = client.chat.completions.create(model="qlp-t0", messages=messages, extra_headers=headers)
    return resp.choices[0].message.content or ""


def captured(r: redis.Redis, n: int, agent: str = "developer") -> list[dict[str, Any]]:
    def ready() -> Any:
        entries: Any = r.xrange(stream_key(agent))
        return [json.loads(f[b"r"]) for _, f in entries] if len(entries) >= n else None

    recs: list[dict[str, Any]] = eventually(ready, what=f"{n} captured records")
    return recs


def raw_stream_bytes(r: redis.Redis) -> bytes:
    entries: Any = [e for k in r.scan_iter("qlp:capture:*") for e in r.xrange(k)]  # type: ignore[union-attr]
    return b"".join(f[b"r"] for _, f in entries)


def export(gw: RunningGateway, redis_url: str, out: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("QLP_CONFIG", str(gw.runtime.settings.config))
    monkeypatch.setenv("QLP_SECRETS_DIR", str(gw.runtime.settings.secrets_dir))
    buf = io.StringIO()
    assert cli.main(["--redis-url", redis_url, "export", "-o", str(out), *args], out=buf) == 0
    return buf.getvalue()


def test_developer_exchanges_on_t0_are_captured_and_no_others(
    client: openai.OpenAI, r: redis.Redis, upstreams: dict[str, FakeUpstream]
) -> None:
    # Not captured: another agent on T0, the developer on T1, no agent at all.
    ask(client, agent="architect")
    ask(client, tier="T1")
    ask(client, agent=None)
    upstreams["a"].push(Script(content="def add(a, b): return a + b"))
    assert ask(client, request_id="req-plain") == "def add(a, b): return a + b"
    assert ask(client, stream=True, request_id="req-stream") == "hello0 hello1 hello2 "
    plain, streamed = captured(r, 2)  # the queue is FIFO: anything captured before would be here too
    assert sorted(k.decode() for k in r.scan_iter("qlp:capture:*")) == ["qlp:capture:developer"]
    assert r.xlen(stream_key("developer")) == 2
    for rec in (plain, streamed):
        assert rec["tier"] == rec["requested_tier"] == "T0"
        assert (rec["backend"], rec["model"], rec["agent"], rec["workflow"], rec["tenant"]) == (
            "a",
            "m0",
            "developer",
            "wf-1",
            "acme",
        )
        assert rec["messages"] == [{"role": "system", "content": "You write code."}, {"role": "user", "content": "hi"}]
        assert rec["outcome"] is None and rec["endpoint"] == "chat" and 0 <= rec["latency_ms"] < 20_000
    assert (plain["request_id"], plain["stream"], plain["response"]) == (
        "req-plain",
        False,
        "def add(a, b): return a + b",
    )
    assert (streamed["request_id"], streamed["stream"], streamed["response"]) == (
        "req-stream",
        True,
        "hello0 hello1 hello2 ",
    )
    assert plain["usage"]["prompt_tokens"] == 5 and plain["usage"]["completion_tokens"] == 3
    assert streamed["usage"]["completion_tokens"] == 3


def test_redaction_canaries_never_reach_the_stream_or_the_export(
    gw: RunningGateway,
    client: openai.OpenAI,
    r: redis.Redis,
    upstreams: dict[str, FakeUpstream],
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret_text = planted() + f"\nbackend key {BACKEND_SECRET}, admin key {ADMIN_KEY}"
    echo = f"you sent {CANARIES['openai']} and {CANARIES['aws']} and {BACKEND_SECRET}"
    upstreams["a"].push(Script(content=echo), Script(content=echo, n_chunks=1))
    assert "CANARY" in ask(client, secret_text)  # the caller gets its answer untouched
    assert "CANARY" in ask(client, secret_text, stream=True)
    recs = captured(r, 2)
    assert all("[REDACTED]" in rec["response"] for rec in recs)
    raw = raw_stream_bytes(r)
    out = tmp_path / "export.jsonl"
    export(gw, redis_url, out, monkeypatch)
    exported = out.read_bytes()
    assert len(exported.splitlines()) == 2
    for blob in (raw, exported):
        assert b"CANARY" not in blob
        assert BACKEND_SECRET.encode() not in blob and ADMIN_KEY.encode() not in blob
        assert "ünïcödé 中文".encode() in blob  # the text around the secrets is kept


def test_export_joins_feedback_outcomes_and_the_trainer_accepts_it(
    gw: RunningGateway,
    client: openai.OpenAI,
    r: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ask(client, "one", request_id="req-own", workflow="wf-a")  # its own feedback: success
    ask(client, "two", request_id="req-wf", workflow="wf-b")  # its workflow's: failure
    ask(client, "three", request_id="req-both", workflow="wf-b")  # its own (success) beats the workflow's
    ask(client, "four", request_id="req-none", workflow="wf-c")  # none: unknown
    captured(r, 4)
    fb = {"score": None, "note": None, "ts": 1}
    r.set(request_key("acme", "req-own"), json.dumps({"outcome": "success", **fb}))
    r.set(workflow_key("acme", "wf-b"), json.dumps({"outcome": "failure", **fb}))
    r.set(request_key("acme", "req-both"), json.dumps({"outcome": "success", **fb}))
    r.set(request_key("other", "req-none"), json.dumps({"outcome": "success", **fb}))  # another tenant's

    out = tmp_path / "all.jsonl"
    summary = export(gw, redis_url, out, monkeypatch, "--agent", "developer")
    assert "4 records written (success 2, failure 1, unknown 1)" in summary
    outcomes = {json.loads(line)["request_id"]: json.loads(line)["outcome"] for line in out.read_text().splitlines()}
    assert outcomes == {"req-own": "success", "req-wf": "failure", "req-both": "success", "req-none": None}
    stats = CaptureStats()
    examples = list(read_capture(out, "developer", stats))
    assert sorted(e.messages[-1][1] for e in examples) == ["one", "three"]
    assert (stats.records, stats.not_success, stats.kept) == (4, 2, 2)

    ok = tmp_path / "success.jsonl"
    export(gw, redis_url, ok, monkeypatch, "--outcome", "success", "--tenant", "acme")
    assert sorted(json.loads(x)["request_id"] for x in ok.read_text().splitlines()) == ["req-both", "req-own"]
    export(gw, redis_url, ok, monkeypatch, "--outcome", "unknown")
    assert [json.loads(x)["request_id"] for x in ok.read_text().splitlines()] == ["req-none"]
    export(gw, redis_url, ok, monkeypatch, "--tenant", "someone-else")
    assert ok.read_text() == ""
    tomorrow = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)).isoformat()
    export(gw, redis_url, ok, monkeypatch, "--since", tomorrow)
    assert ok.read_text() == ""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    export(gw, redis_url, ok, monkeypatch, "--since", today, "--until", today)
    assert len(ok.read_text().splitlines()) == 4


def test_export_reapplies_redaction_patterns_added_after_the_capture(
    gw: RunningGateway,
    client: openai.OpenAI,
    r: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ask(client, "project LATECANARY-7 is secret")
    captured(r, 1)
    assert b"LATECANARY-7" in raw_stream_bytes(r)  # no pattern for it when it was captured
    config = Path(gw.runtime.settings.config)
    cfg = yaml.safe_load(config.read_text())
    cfg["capture"]["redact"] = [r"LATECANARY-\d+"]
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "late.jsonl"
    export(gw, redis_url, out, monkeypatch)
    assert "LATECANARY" not in out.read_text() and "project [REDACTED] is secret" in out.read_text()


def test_capture_cli_stats_and_errors(
    client: openai.OpenAI, r: redis.Redis, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ask(client)
    captured(r, 1)
    buf = io.StringIO()
    assert cli.main(["--redis-url", redis_url, "stats", "--json"], out=buf) == 0
    [row] = json.loads(buf.getvalue())
    assert (row["agent"], row["records"]) == ("developer", 1)
    assert cli.main(["--redis-url", redis_url, "stats"], out=io.StringIO()) == 0
    assert cli.main(["--redis-url", redis_url, "export", "-o", str(tmp_path / "x"), "--since", "June"]) == 2
    assert cli.main(["--redis-url", "redis://127.0.0.1:1/0", "stats"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("qlp capture: ") for line in err)
    assert not (tmp_path / "x").exists()
