"""Feedback and the report through a real gateway (metering on, real Redis, the official openai client).

The key guarantee: every figure of the report equals the one computed here, independently, from the ledger
export (`qlp ledger export`) and the feedback this test posted.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import defaultdict
from typing import Any

import httpx
import openai
import redis

from gateway.metering import ledger_cli
from gateway.metering.layout import KeyKeys
from gateway.report import cli as report_cli
from gateway.report import compute
from tests.fakes.gateway import RunningGateway
from tests.metered import ADMIN_KEY, MSG, auth, create_key
from tests.wait import eventually

N_REQUESTS = 7


def _traffic(gw: RunningGateway, key: str) -> None:
    """Seven requests: a three-request workflow of the developer on T0, two T1 requests of the tester,
    two T0 requests without an agent; every request id is ours."""
    dev = openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key=key,
        max_retries=0,
        default_headers={"X-QLP-Agent": "developer", "X-QLP-Workflow-Id": "wf-1"},
    )
    for i in range(3):
        dev.chat.completions.create(model="qlp-t0", messages=MSG, extra_headers={"X-Request-Id": f"dev-{i}"})  # type: ignore[arg-type]
    tester = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, default_headers={"X-QLP-Agent": "test"})
    for i in range(2):
        tester.chat.completions.create(model="qlp-t1", messages=MSG, extra_headers={"X-Request-Id": f"test-{i}"})  # type: ignore[arg-type]
    plain = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    for i in range(2):
        list(
            plain.chat.completions.create(
                model="qlp-t0",
                messages=MSG,
                stream=True,  # type: ignore[arg-type]
                extra_headers={"X-Request-Id": f"plain-{i}"},
            )
        )


def _export(redis_url: str, tenant: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    assert ledger_cli.main(["--redis-url", redis_url, "export", "--format", "jsonl", "--tenant", tenant], out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _ledger(redis_url: str, tenant: str, n: int) -> list[dict[str, Any]]:
    recs: list[dict[str, Any]] = eventually(
        lambda: (r := _export(redis_url, tenant)) and len(r) >= n and r, what=f"{n} ledger records"
    )
    return recs


def feedback(gw: RunningGateway, key: str, **body: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/feedback", json=body, headers=auth(key), timeout=10)


def _expected(
    records: list[dict[str, Any]], by_request: dict[str, str], by_workflow: dict[str, str]
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The report's figures, from first principles."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["requested_tier"], r["agent"] or "(none)", r["arm"] or "default")].append(r)
    out = {}
    for k, recs in groups.items():
        outcomes = [by_request.get(r["request_id"]) or by_workflow.get(r["workflow"] or "") for r in recs]
        known = [o for o in outcomes if o]
        wins = known.count("success")
        lat = sorted(r["latency_ms"] for r in recs)
        cost = sum(r["cost_micros"] for r in recs)
        ref = sum(r["reference_cost_micros"] for r in recs)
        wfs = {r["workflow"] for r in recs if r["workflow"]}
        wf_cost = sum(r["cost_micros"] for r in recs if r["workflow"])
        out[k] = {
            "requests": len(recs),
            "workflows": len(wfs),
            "feedback": len(known),
            "successes": wins,
            "success_rate": wins / len(known) if known else None,
            "latency_p50_ms": lat[math.ceil(0.5 * len(lat)) - 1],
            "latency_p95_ms": lat[math.ceil(0.95 * len(lat)) - 1],
            "cost_micros": cost,
            "counterfactual_micros": ref,
            "cost_per_request_micros": round(cost / len(recs) + 1e-9),
            "cost_per_workflow_micros": round(wf_cost / len(wfs) + 1e-9) if wfs else None,
            "saved_share": 1 - cost / ref if ref else None,
        }
    return out


def test_report_figures_equal_those_computed_from_the_ledger_export_and_feedback(metered, redis_url, tmp_path) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    _traffic(gw, key)
    records = _ledger(redis_url, "acme", N_REQUESTS)
    assert len(records) == N_REQUESTS
    # The workflow succeeded, but one of its requests is marked failed on its own (request feedback wins);
    # one tester request failed, one succeeded; the plain requests got no feedback.
    posted = [
        ({"workflow_id": "wf-1", "outcome": "success"}, 3),
        ({"request_id": "dev-2", "outcome": "failure"}, 1),
        ({"request_id": "test-0", "outcome": "failure", "score": 0.2, "note": "tests fail"}, 1),
        ({"request_id": "test-1", "outcome": "failure"}, 1),
        ({"request_id": "test-1", "outcome": "success", "score": 1}, 1),
    ]  # re-posted: the latest wins
    for body, n in posted:
        r = feedback(gw, key, **body)
        assert r.status_code == 200, r.text
        assert r.json()["applied_to"] == n and r.json()["outcome"] == body["outcome"]
    by_request = {"dev-2": "failure", "test-0": "failure", "test-1": "success"}
    by_workflow = {"wf-1": "success"}

    rep = httpx.get(gw.url + "/v1/report", headers=auth(key), timeout=10).json()
    expected = _expected(records, by_request, by_workflow)
    got = {(r["tier"], r["agent"], r["arm"]): r for r in rep["data"]}
    assert (
        set(got)
        == set(expected)
        == {("T0", "developer", "default"), ("T1", "test", "default"), ("T0", "(none)", "default")}
    )
    for k, figures in expected.items():
        assert {f: got[k][f] for f in figures} == figures, k
        rate = figures["success_rate"]
        assert got[k]["success_ci95"] == (
            None if rate is None else list(compute.wilson(figures["successes"], figures["feedback"]) or ())
        )
    assert got[("T0", "developer", "default")]["success_rate"] == 2 / 3
    assert rep["total"]["requests"] == N_REQUESTS
    assert rep["total"]["cost_micros"] == sum(r["cost_micros"] for r in records)
    assert rep["total"]["counterfactual_micros"] == sum(r["reference_cost_micros"] for r in records)
    assert {t["tier"]: t["requests"] for t in rep["tiers"]} == {"T0": 5, "T1": 2}

    # The same report from the CLI: a table, and a chart page.
    out, page = io.StringIO(), tmp_path / "report.html"
    assert report_cli.main(["--redis-url", redis_url, "--tenant", "acme", "--html", str(page)], out) == 0
    text = out.getvalue()
    assert "SUCCESS [95% CI]" in text and "66.7% [" in text and "TOTAL" in text
    html = page.read_text()
    assert (
        html.count("<svg") == 3
        and "<script" not in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    out = io.StringIO()
    assert report_cli.main(["--redis-url", redis_url, "--tenant", "acme", "--json"], out) == 0
    assert json.loads(out.getvalue())["data"] == rep["data"]


def test_feedback_is_counted_per_tier_backend_and_model_on_metrics(metered, redis_url) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    _traffic(gw, key)
    records = _ledger(redis_url, "acme", N_REQUESTS)
    assert feedback(gw, key, workflow_id="wf-1", outcome="success").status_code == 200
    r = feedback(gw, key, request_id="test-0", outcome="failure")
    t1 = next(x for x in records if x["request_id"] == "test-0")
    assert (r.json()["tier"], r.json()["backend"], r.json()["model"]) == (t1["tier"], t1["backend"], t1["model"])
    dev = next(x for x in records if x["request_id"] == "dev-0")
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    line = (
        f'qlp_feedback_total{{backend="{dev["backend"]}",model="{dev["model"]}",outcome="success",'
        f'tier="{dev["tier"]}"}} 3.0'
    )
    assert line in text
    assert (
        f'qlp_feedback_total{{backend="{t1["backend"]}",model="{t1["model"]}",outcome="failure",'
        f'tier="{t1["tier"]}"}} 1.0'
    ) in text


def test_unknown_ids_and_other_tenants_requests_are_not_found(metered, redis_url) -> None:
    key, _ = create_key(redis_url, "acme")
    other, _ = create_key(redis_url, "globex")
    gw = metered()
    _traffic(gw, key)
    _ledger(redis_url, "acme", N_REQUESTS)
    for body, code in (
        ({"request_id": "nope", "outcome": "success"}, "request_not_found"),
        ({"workflow_id": "nope", "outcome": "success"}, "workflow_not_found"),
    ):
        r = feedback(gw, key, **body)
        assert r.status_code == 404 and r.json()["error"]["code"] == code
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Another tenant's request and workflow: 404 as if they did not exist (existence is not revealed).
    for body in ({"request_id": "dev-0", "outcome": "success"}, {"workflow_id": "wf-1", "outcome": "failure"}):
        assert feedback(gw, other, **body).status_code == 404
    # Naming the other tenant outright is refused; the admin key may do it.
    assert feedback(gw, other, request_id="dev-0", outcome="success", tenant="acme").status_code == 403
    r = feedback(gw, ADMIN_KEY, request_id="dev-0", outcome="success", tenant="acme")
    assert r.status_code == 200 and r.json()["tenant"] == "acme"


def test_malformed_feedback_is_refused_with_the_openai_envelope(metered, redis_url) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    for body in (
        {"outcome": "success"},  # no id
        {"request_id": "a", "workflow_id": "b", "outcome": "success"},  # both
        {"request_id": "a", "outcome": "maybe"},
        {"request_id": "a", "outcome": "success", "score": 1.5},
        {"request_id": "a", "outcome": "success", "score": "0.5"},
        {"request_id": "a", "outcome": "success", "note": "x" * 2001},
        {"request_id": "a", "outcome": "success", "extra": 1},
    ):
        r = feedback(gw, key, **body)
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(gw.url + "/v1/feedback", json={"request_id": "a", "outcome": "success"}).status_code == 401


def test_report_html_route_and_range_rules(metered, redis_url) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    _traffic(gw, key)
    _ledger(redis_url, "acme", N_REQUESTS)
    r = httpx.get(gw.url + "/v1/report", params={"format": "html", "tier": "T1"}, headers=auth(key), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "<svg" in r.text
    r = httpx.get(gw.url + "/v1/report", params={"agent": "test"}, headers=auth(key), timeout=10).json()
    assert [(x["tier"], x["agent"]) for x in r["data"]] == [("T1", "test")]
    old = httpx.get(gw.url + "/v1/report", params={"since": "2000-01-01", "until": "2000-01-02"}, headers=auth(key))
    assert old.status_code == 200 and old.json()["total"]["requests"] == 0
    assert httpx.get(gw.url + "/v1/report", params={"since": "junk"}, headers=auth(key)).status_code == 400
    assert httpx.get(gw.url + "/v1/report", params={"tenant": "globex"}, headers=auth(key)).status_code == 403
    smuggled = httpx.get(gw.url + "/v1/report?tenant=acme&tenant=globex", headers=auth(ADMIN_KEY))
    assert smuggled.status_code == 400 and smuggled.json()["error"]["param"] == "tenant"


def test_feedback_and_report_answer_503_when_redis_is_down(metered) -> None:
    gw = metered(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    r = feedback(gw, ADMIN_KEY, request_id="a", outcome="success")
    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
    r = httpx.get(gw.url + "/v1/report", params={"tenant": "acme"}, headers=auth(ADMIN_KEY), timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"


def test_requests_are_found_by_the_day_s_request_index_and_by_the_older_one_key_per_request(metered, redis_url) -> None:
    key, info = create_key(redis_url, "acme")
    gw = metered()
    _traffic(gw, key)
    records = _ledger(redis_url, "acme", N_REQUESTS)
    kk = KeyKeys(info.id)
    with redis.Redis.from_url(redis_url) as r:
        ts = next(x for x in records if x["request_id"] == "dev-1")["ts"]
        index = kk.requests(time.strftime("%Y%m%d", time.gmtime(ts // 1000)))
        assert r.hget(index, "dev-1")  # one hash per day
        assert not r.exists(kk.request("dev-1"))
        # A request booked before the index was kept by day: its own key, as it was written then.
        entry = r.hget(index, "dev-2")
        r.hdel(index, "dev-2")
        r.set(kk.request("dev-2"), entry, ex=60)
    for rid in ("dev-1", "dev-2"):
        res = feedback(gw, key, request_id=rid, outcome="success")
        assert res.status_code == 200 and res.json()["applied_to"] == 1
