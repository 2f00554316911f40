"""Canary secrets planted in the config and in requests never appear where callers or operators look.

Planted: the T3 upstream key (a secrets file), the bootstrap admin key, the Redis password (in the Redis
URL), an unknown API key presented by a caller, keys inside request bodies and headers (an `api_key`
field, `X-Api-Key`, an `Authorization: Bearer ...` line inside a message), and an upstream that echoes its
key in error answers. Looked for in: every response body and header, the logs (all levels; the stderr of a
`qlp gateway` process), /metrics, /healthz, /readyz, /openapi.json, /v1/models, key listings, ledger
reads over HTTP, `qlp ledger` output and export, everything stored in Redis, and the spool on disk.
(Message text legitimately reaches the upstream; redacting a capture stream is a later issue.)
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path

import httpx
import pytest
import redis

from gateway.metering import ledger_cli
from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import Script
from tests.reliability.conftest import CANARY_ADMIN, CANARY_T3, MSG, auth, create_key, fleet
from tests.wait import eventually

CANARY_REDIS = "CANARY-redis-password-a17f3c"
CANARY_CALLER_KEY = "qlp-CANARY-unknown-caller-key-4d2b9e0f1a3c5e7d"
CANARY_BODY_KEY = "sk-CANARY-body-field-key-8e6c4a2f0d1b3e5f"
CANARY_HEADER_KEY = "sk-CANARY-x-api-key-header-2c4e6a8b0d1f3a5c"
CANARY_IN_MESSAGE = "sk-CANARY-inside-a-message-9b7d5f3a1c2e4f6b"
CANARIES = [
    CANARY_T3,
    CANARY_ADMIN,
    CANARY_REDIS,
    CANARY_CALLER_KEY,
    CANARY_BODY_KEY,
    CANARY_HEADER_KEY,
    CANARY_IN_MESSAGE,
]


def leaked(text: str) -> list[str]:
    return [c for c in CANARIES if c in text]


def seen(r: httpx.Response) -> str:
    return f"{r.status_code} {dict(r.headers)} {r.text}"


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    server = RedisServer(tmp_path / "redis-locked").start()
    with server.client() as c:
        c.config_set("requirepass", CANARY_REDIS)
    yield server, f"redis://:{CANARY_REDIS}@127.0.0.1:{server.port}/0"
    server.stop()


def redis_contents(port: int) -> str:
    """Every key and every value stored, as text."""
    out = []
    with redis.Redis(port=port, password=CANARY_REDIS) as c:
        for key in c.scan_iter(count=1000):
            kind = c.type(key).decode()
            value = {
                "string": lambda k: c.get(k),
                "hash": c.hgetall,
                "set": c.smembers,
                "zset": lambda k: c.zrange(k, 0, -1, withscores=True),
                "list": lambda k: c.lrange(k, 0, -1),
                "stream": lambda k: c.xrange(k),
            }[kind](key)
            out.append(f"{key!r} {value!r}")
    return "\n".join(out)


def test_canaries_never_reach_logs_errors_metrics_health_or_the_ledger(
    metered, upstreams, secrets_dir, tmp_path, locked_redis, caplog
) -> None:
    server, url = locked_redis
    (secrets_dir / "admin_key").write_text(CANARY_ADMIN)
    (secrets_dir / "t3_api_key").write_text(CANARY_T3)
    key, _ = create_key(url, "tenant-a")
    caplog.set_level(logging.DEBUG)
    gw = metered(fleet(upstreams, t3=True), redis_url=url, admission_when_redis_down="open", spool_replay_interval=0.05)
    seen_by_callers: list[str] = []

    def post(body: dict[str, object], caller_key: str = key, **headers: str) -> httpx.Response:
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={**auth(caller_key), **headers}, timeout=20)
        seen_by_callers.append(seen(r))
        return r

    def get(path: str, caller_key: str | None = CANARY_ADMIN) -> httpx.Response:
        r = httpx.get(gw.url + path, headers=auth(caller_key) if caller_key else {}, timeout=20)
        seen_by_callers.append(seen(r))
        return r

    secret_message = [{"role": "user", "content": f"my key: Authorization: Bearer {CANARY_IN_MESSAGE}"}]
    wf = {"X-QLP-Workflow-Id": "wf-canary"}
    # Served requests carrying keys in the body, in headers and in the message.
    assert (
        post(
            {"model": "qlp-t0", "messages": secret_message, "api_key": CANARY_BODY_KEY},
            **{"X-Api-Key": CANARY_HEADER_KEY, **wf},
        ).status_code
        == 200
    )
    assert (
        post(
            {"model": "qlp-t0", "messages": secret_message, "stream": True, "api_key": CANARY_BODY_KEY}, **wf
        ).status_code
        == 200
    )
    assert CANARY_BODY_KEY not in str(upstreams["a"].requests) and CANARY_HEADER_KEY not in str(upstreams["a"].requests)
    # Refused requests carrying them.
    assert post({"messages": [], "api_key": CANARY_BODY_KEY}).status_code == 400
    assert post({"messages": secret_message, "n": "many", "api_key": CANARY_BODY_KEY}).status_code == 400
    assert post({"model": "qlp-t0", "messages": MSG}, caller_key=CANARY_CALLER_KEY).status_code == 401
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"messages": MSG},
        headers={"Authorization": f"Basic {CANARY_CALLER_KEY}"},
        timeout=20,
    )
    seen_by_callers.append(seen(r))
    assert r.status_code == 401
    assert get("/v1/ledger/summary", CANARY_CALLER_KEY).status_code == 401
    # The T3 upstream echoes its own key in every kind of error answer.
    echo = {
        "error": {
            "message": f"Incorrect API key provided: {CANARY_T3}. Bearer {CANARY_T3}",
            "type": "x",
            "code": "invalid_api_key",
        }
    }
    for status in (401, 403, 400, 404, 422, 429, 500, 503):
        upstreams["c"].default = Script(status=status, body=echo)
        r = post({"model": "qlp-t3", "messages": MSG})
        assert r.status_code >= 400
    upstreams["c"].default = Script()
    assert all(
        f"Bearer {CANARY_T3}" == {k.lower(): v for k, v in q["headers"].items()}["authorization"]
        for q in upstreams["c"].requests
    )  # it was sent, to the right place only
    # The admin's own calls.
    assert httpx.post(gw.url + "/v1/admin/keys", json={"tenant": "t2"}, headers=auth(CANARY_ADMIN)).status_code == 201
    for path in (
        "/v1/admin/keys",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/v1/models",
        "/v1/ledger/workflows/wf-canary",
        *(f"/v1/ledger/summary?group_by={g}" for g in ("tier", "model", "agent", "workflow", "day", "tenant", "key")),
    ):
        assert get(path).status_code in (200, 503), path
    eventually(lambda: get("/v1/ledger/summary").json()["total"]["requests"] >= 2, what="the charges booked")
    # `qlp ledger`: summary, workflow and export, as an operator runs them.
    cli_out = io.StringIO()
    cli_err = io.StringIO()
    with redirect_stderr(cli_err):
        for args in (
            ["summary", "--by", "workflow", "--json"],
            ["workflow", "wf-canary", "--json"],
            ["export", "--format", "jsonl"],
            ["export", "--format", "csv"],
        ):
            assert ledger_cli.main(["--redis-url", url, *args], cli_out) == 0
    assert "wf-canary" in cli_out.getvalue()
    stored = redis_contents(server.port)
    assert "wf-canary" in stored
    # Redis goes away: the outage paths log, spool and report.
    server.kill()
    assert post({"model": "qlp-t0", "messages": secret_message, "api_key": CANARY_BODY_KEY}).status_code == 200
    for path in ("/readyz", "/metrics", "/v1/ledger/summary"):
        get(path)
    eventually(lambda: get("/readyz").json()["ledger"]["spool_depth"] >= 1, what="a spooled charge")
    with redirect_stderr(cli_err):
        assert ledger_cli.main(["--redis-url", url, "summary"], io.StringIO()) == 1
    spool = "".join(p.read_text() for p in (tmp_path / "spool").glob("*"))
    assert spool

    places = {
        "responses": "\n".join(seen_by_callers),
        "logs": caplog.text,
        "qlp ledger": cli_out.getvalue(),
        "qlp ledger stderr": cli_err.getvalue(),
        "redis": stored,
        "spool": spool,
    }
    found = {where: leaked(text) for where, text in places.items() if leaked(text)}
    assert not found, f"canaries leaked: {found}"
    assert caplog.records, "nothing was logged: the log check would prove nothing"


def test_canaries_never_reach_a_gateway_process_output(
    gateway_process, upstreams, redis_url, pricing_file, tmp_path
) -> None:
    """The same for `qlp gateway` at debug level with access logs: its stdout and stderr."""
    key, _ = create_key(redis_url, "tenant-a")
    cfg = fleet(upstreams, t3=True)
    gp = gateway_process(
        cfg,
        env={
            "QLP_METERING": "true",
            "QLP_REDIS_URL": redis_url,
            "QLP_PRICING": str(pricing_file),
            "QLP_ADMIN_KEY": CANARY_ADMIN,
            "QLP_T3_API_KEY": CANARY_T3,
        },
        log_level="debug",
    )
    echo = {"error": {"message": f"Incorrect API key provided: {CANARY_T3}", "type": "x"}}
    upstreams["c"].push(Script(status=401, body=echo), Script(status=500, body=echo))
    with httpx.Client(base_url=gp.url, timeout=20) as c:
        bodies = [
            c.post("/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG}, headers=auth(key)),
            c.post("/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG}, headers=auth(key)),
            c.post("/v1/chat/completions", json={"messages": MSG}, headers=auth(CANARY_CALLER_KEY)),
            c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": CANARY_IN_MESSAGE}], "api_key": CANARY_BODY_KEY},
                headers={**auth(key), "X-Api-Key": CANARY_HEADER_KEY},
            ),
            c.get("/v1/admin/keys", headers=auth(CANARY_ADMIN)),
            c.get("/metrics"),
            c.get("/readyz"),
        ]
    assert [r.status_code for r in bodies[:4]] == [502, 502, 401, 200]
    texts = "\n".join(seen(r) for r in bodies)
    gp.stop()
    output = gp.output()
    assert "GET /metrics" in output, "no access log: the check would prove nothing"
    assert not leaked(texts) and not leaked(output), (leaked(texts), leaked(output))
