"""End to end: a real Prometheus, running the project's scrape config and rules, scrapes a real gateway
(metering on, real Redis) and real vLLM (the session's engine, the base model) under a little traffic sent with
the official openai client. Then every PromQL expression the project ships must parse and return data:
every dashboard panel (Grafana variables replaced by what their own queries return), every recording
rule, and every alert without its threshold (tests/observability/exprs.py explains the convention).

The traffic covers what the panels show: a stream on T0, a fallback (T1's model server is down: the
gateway's probe sees it and T1 falls back to T2), plain and streamed requests to T3 (a fake provider),
retries and a 5xx (T3 answers 503 three times), a budget rejection, a rate-limit rejection and a 400; the
learning loop's counters: T0's developer exchanges are captured, T1's requests are mirrored to T0 as shadow
traffic, and the workflow gets success feedback after each round. It is sent in two rounds with a scrape between them: the first creates the series, the second moves them, so
that rates and quantiles have something to compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aredis
from openai.types.chat import ChatCompletionMessageParam

from gateway.metering.keys import KeyLimits, KeyStore
from tests.conftest import RunningVllm
from tests.fakes.gateway import RunningGateway, free_port, start_gateway
from tests.fakes.upstream import FakeUpstream, Script
from tests.observability import exprs
from tests.observability.prom import Prometheus, loopback_config, require_binary, running
from tests.wait import eventually

ROOT = exprs.ROOT
MODEL_DIR = ROOT / "models" / "base"
BASE = "SmolLM2-135M-Instruct"
QLP = Path(sys.executable).with_name("qlp")
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi"}]
DATA_TIMEOUT_S = 5.0  # a margin only: the fixture waits until the rules were evaluated on all traffic
REQUESTS_PER_ROUND = 9  # sent by _round(), counted by the gateway
# Of which the model server serves (each costs seconds on a busy 2-core CPU), plus the shadow of T1's request.
MODEL_REQUESTS_PER_ROUND = 3


# -- processes ---------------------------------------------------------------------------------------------


def _vllm_requests(url: str) -> int:
    """Requests vLLM has finished so far (the session's engine also serves other suites)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("vllm:e2e_request_latency_seconds_count")
    )


def _create_keys(redis_url: str) -> dict[str, str]:
    async def go() -> dict[str, str]:
        r = aredis.Redis.from_url(redis_url)
        try:
            store = KeyStore(r)
            user, _ = await store.create("observability", name="traffic")
            broke, _ = await store.create("observability", name="broke", limits=KeyLimits(budget_day_micros=1))
            limited, _ = await store.create("observability", name="limited", limits=KeyLimits(rpm=1))
            return {"user": user, "broke": broke, "limited": limited}
        finally:
            await r.aclose()

    return asyncio.run(go())


def fleet_config(model_server_url: str, t3_url: str) -> dict[str, Any]:
    local = {"model": BASE, "timeouts": {"first_byte": 120, "idle": 60, "total": 300}}
    return {
        "default_tier": "T0",
        "health_interval": 1,
        "retry": {"max_attempts": 3, "backoff_base": 0.001, "backoff_max": 0.01},
        "breaker": {"failures": 100, "cooldown": 300},  # only the prober ejects (T1) in this test
        "tiers": {
            "T0": {
                **local,
                "aliases": ["qlp-t0"],
                "fallback": ["T1"],
                "backends": [{"name": "t0-local", "base_url": f"{model_server_url}/v1", "health_path": "/health"}],
            },
            # T1's model server is down (nothing listens there): its requests fall back to T2.
            "T1": {
                **local,
                "aliases": ["qlp-t1"],
                "fallback": ["T2"],
                "backends": [
                    {"name": "t1-local", "base_url": f"http://127.0.0.1:{free_port()}/v1", "health_path": "/health"}
                ],
            },
            "T2": {
                **local,
                "aliases": ["qlp-t2"],
                "fallback": ["T3"],
                "backends": [{"name": "t2-local", "base_url": f"{model_server_url}/v1", "health_path": "/health"}],
            },
            "T3": {
                "kind": "openai",
                "model": "gpt-4",
                "aliases": ["qlp-t3"],
                "backends": [{"name": "openai", "base_url": t3_url}],
            },
        },
        "capture": {"targets": {"T0": ["developer"]}},
        # Every request for T1 (served by T2 after the fallback) is mirrored to T0: one shadow call per round.
        "rollouts": {"T1/*": {"shadow": {"tier": "T0", "share": 1.0}}},
    }


# -- traffic -----------------------------------------------------------------------------------------------


def _client(gw: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=180)


def _ask(c: openai.OpenAI, tier: str, stream: bool) -> str:
    """One request (2 tokens at most: a stream has one inter-token gap); the tier that served it."""
    headers = {"X-QLP-Tier": tier, "X-QLP-Workflow-Id": "wf-observability", "X-QLP-Agent": "developer"}
    if not stream:
        raw = c.chat.completions.with_raw_response.create(model=BASE, messages=MSG, max_tokens=2, extra_headers=headers)
        assert raw.parse().choices
        return str(raw.headers["x-qlp-tier"])
    with c.chat.completions.with_streaming_response.create(
        model=BASE, messages=MSG, max_tokens=2, stream=True, stream_options={"include_usage": True},
        extra_headers=headers,
    ) as resp:  # fmt: skip
        served = str(resp.headers["x-qlp-tier"])
        chunks = list(resp.parse())
    assert chunks and chunks[-1].usage is not None
    return served


def _round(gw: RunningGateway, t3: FakeUpstream, keys: dict[str, str]) -> None:
    user = _client(gw, keys["user"])
    plan = [("T0", True), ("T1", False), ("T3", False), ("T3", True)]
    with ThreadPoolExecutor(len(plan)) as pool:  # together: the model server batches them
        served = list(pool.map(lambda p: _ask(user, *p), plan))
    assert served == ["T0", "T2", "T3", "T3"], served  # T1 fell back to T2
    t3.push(*(Script(status=503) for _ in range(3)))  # every attempt fails: retries, then a 5xx
    with pytest.raises(openai.APIStatusError) as failed:
        _ask(user, "T3", False)
    assert failed.value.status_code >= 500
    with pytest.raises(openai.RateLimitError) as broke:
        _ask(_client(gw, keys["broke"]), "T3", False)
    assert broke.value.code == "budget_exceeded"
    limited = _client(gw, keys["limited"])
    with contextlib.suppress(openai.RateLimitError):  # the first of the minute is admitted
        _ask(limited, "T3", False)
    with pytest.raises(openai.RateLimitError):
        _ask(limited, "T3", False)
    with pytest.raises(openai.BadRequestError):
        _ask(user, "T9", False)

    def feedback() -> bool:  # the workflow's records are booked just after their responses
        r = httpx.post(
            gw.url + "/v1/feedback",
            json={"workflow_id": "wf-observability", "outcome": "success"},
            headers={"Authorization": f"Bearer {keys['user']}"},
            timeout=10,
        )
        assert r.status_code in (200, 404), r.text
        return r.status_code == 200

    eventually(feedback, 10, "feedback on the round's workflow")


def _gateway_count(gw: RunningGateway) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("qlp_requests_total{"))


def _scraped(prom: Prometheus, expr: str) -> float:
    doc = prom.query(expr)
    result = doc.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else 0.0


# -- the fleet under observation ---------------------------------------------------------------------------


@dataclass
class Observed:
    prom: Prometheus
    gateway: RunningGateway


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, vllm_server: RunningVllm) -> Iterator[Observed]:
    prometheus = require_binary("prometheus")
    require_binary("redis-server", "redis-server")
    from tests.fakes.redis_server import RedisServer

    assert (MODEL_DIR / "config.json").is_file(), "models/base is missing: run `make model` first"
    tmp = tmp_path_factory.mktemp("observability")
    with contextlib.ExitStack() as stack:
        ms_url = vllm_server.url
        served_before = _vllm_requests(ms_url)
        redis = RedisServer(tmp / "redis").start()
        stack.callback(redis.stop)
        t3 = FakeUpstream("t3").start()
        stack.callback(t3.stop)
        keys = _create_keys(redis.url)
        (tmp / "secrets").mkdir()
        gw = start_gateway(
            fleet_config(ms_url, t3.base_url),
            tmp,
            metering=True,
            redis_url=redis.url,
            pricing=ROOT / "config" / "pricing.yaml",
        )
        stack.callback(gw.stop)

        ms_addr, gw_addr = ms_url.removeprefix("http://"), f"127.0.0.1:{gw.port}"
        # One vLLM engine stands behind the three tier targets of the `vllm` job.
        cfg = loopback_config({"qlp-gateway": gw_addr, "vllm": ms_addr})
        prom = stack.enter_context(running(prometheus, cfg, tmp / "prometheus"))
        # Round 1 creates the series, round 2 (after Prometheus has seen round 1) makes them move.
        for n in (1, 2):
            _round(gw, t3, keys)
            _wait_scraped(gw, prom, n, served_before)
        # Twice, so that rules reading another group's recorded series (the budget) see this evaluation's.
        scraped = time.time()
        eventually(lambda: _rules_evaluated_since(prom, scraped + 1.5), 15, "every rule group evaluated twice")
        yield Observed(prom, gw)


def _wait_scraped(gw: RunningGateway, prom: Prometheus, rounds: int, served_before: int) -> None:
    """Until Prometheus has scraped what `rounds` rounds of traffic did, on the gateway and the model server."""
    expected, served = rounds * REQUESTS_PER_ROUND, served_before + rounds * MODEL_REQUESTS_PER_ROUND
    eventually(lambda: _gateway_count(gw) == expected, 10, f"the gateway to count {expected} requests")
    eventually(lambda: _all_up(prom), 30, "every scrape target up")
    eventually(
        lambda: _scraped(prom, 'sum(qlp_requests_total{job="qlp-gateway"})') == expected,
        15,
        f"prometheus to scrape {expected} gateway requests",
    )
    eventually(
        lambda: _scraped(prom, "min(vllm:e2e_request_latency_seconds_count)") == served,
        15,
        f"prometheus to scrape {served} model server requests from every model-server target",
    )


def _rules_evaluated_since(prom: Prometheus, t: float) -> bool:
    groups = prom.api("rules")["groups"]
    return bool(groups) and all(datetime.fromisoformat(g["lastEvaluation"]).timestamp() > t for g in groups)


def _all_up(prom: Prometheus) -> bool:
    targets = prom.targets()
    return bool(targets) and all(t["health"] == "up" for t in targets)


# -- checking expressions ----------------------------------------------------------------------------------


def _problem(prom: Prometheus, q: exprs.Query) -> str | None:
    """None when the query parses and returns at least one sample that is a number (not NaN)."""
    doc = prom.query(q.expr)
    if doc.get("status") != "success":
        return f"{q.where}: {doc.get('errorType')}: {doc.get('error')}\n    {q.expr}"
    data = doc["data"]
    values = [data["result"][1]] if data["resultType"] == "scalar" else [s["value"][1] for s in data["result"]]
    if not values:
        return f"{q.where}: no data\n    {q.expr}"
    if all(math.isnan(float(v)) for v in values):
        return f"{q.where}: only NaN\n    {q.expr}"
    return None


def assert_all_return_data(prom: Prometheus, queries: list[exprs.Query], timeout: float = DATA_TIMEOUT_S) -> None:
    """Poll (rules are evaluated every second) until every query has data, or fail listing those without."""
    assert queries
    deadline = time.monotonic() + timeout
    while True:
        problems = [p for q in queries if (p := _problem(prom, q))]
        if not problems:
            return
        if time.monotonic() > deadline or any("bad_data" in p for p in problems):
            pytest.fail(f"{len(problems)} of {len(queries)} expressions fail:\n" + "\n".join(problems), pytrace=False)
        time.sleep(0.5)


def _variable_values(prom: Prometheus) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Per dashboard: each template variable's value as Grafana renders "All" (plus the built-ins), and
    the variables that have no values (rendered `.+` so that their panels are still checked)."""
    out: dict[str, dict[str, str]] = {}
    empty: list[str] = []
    for name, d in exprs.dashboards().items():
        values = dict(exprs.BUILTINS)
        for v in exprs.variables(name, d):
            selector = exprs.substitute(v.selector, values)
            found = exprs.grafana_regex_filter(v.regex, prom.label_values(selector, v.label))
            if not found:
                empty.append(f"{name}: ${v.name} = label_values({selector}, {v.label}) has no values")
            values[v.name] = exprs.regex_value(found) if found else ".+"
        out[name] = values
    return out, empty


# -- the guarantees ----------------------------------------------------------------------------------------


def test_every_scrape_job_of_the_config_is_up(observed: Observed) -> None:
    jobs = {t["labels"]["job"] for t in observed.prom.targets() if t["health"] == "up"}
    assert jobs == {"qlp-gateway", "vllm"}
    tiers = {t["labels"].get("tier") for t in observed.prom.targets() if t["labels"]["job"] == "vllm"}
    assert tiers == {"T0", "T1", "T2"}, "model-server targets carry their tier"


def test_every_dashboard_variable_has_values(observed: Observed) -> None:
    _, empty = _variable_values(observed.prom)
    assert not empty, "\n".join(empty)


def test_every_dashboard_query_returns_data(observed: Observed) -> None:
    values, _ = _variable_values(observed.prom)
    queries = [
        exprs.Query(q.where, exprs.substitute(q.expr, values[q.where.split(" / ")[0]]))
        for q in exprs.dashboard_queries()
    ]
    assert_all_return_data(observed.prom, queries)


def test_every_recording_rule_returns_data(observed: Observed) -> None:
    rules = exprs.recording_rules()
    queries = [exprs.Query(f"rule {r['record']}", r["expr"]) for r in rules]
    queries += [exprs.Query(f"recorded series {r['record']}", r["record"]) for r in rules]
    assert_all_return_data(observed.prom, queries)


def test_every_alert_watches_series_that_have_data(observed: Observed) -> None:
    queries = [
        exprs.Query(f"alert {a['alert']} without its threshold", exprs.strip_threshold(a["expr"]))
        for a in exprs.alerts()
    ]
    assert_all_return_data(observed.prom, queries)


def test_alerts_for_what_is_broken_are_pending_or_firing(observed: Observed) -> None:
    """T1's model server is down in this fleet and T1 serves nothing: the alerts see it (pending, as their
    `for` has not elapsed)."""
    expected = {"QLPBackendDown", "QLPBackendEjected", "QLPNoTrafficOnTier"}

    def t1_alerts() -> set[str]:
        return {
            a["labels"]["alertname"] for a in observed.prom.api("alerts")["alerts"] if a["labels"].get("tier") == "T1"
        }

    eventually(lambda: expected <= t1_alerts(), 15, f"{sorted(expected)} for T1")
