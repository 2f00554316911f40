"""What is booked: exactly once per request, in integer micro-dollars, for every request that was served,
streamed or not, finished or not; and reading it back (routes and `qlp ledger`)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import time
from fractions import Fraction
from typing import Any

import httpx
import openai
from redis.asyncio import Redis

from gateway.metering import ledger_cli
from gateway.metering.layout import KeyKeys, day_of
from gateway.metering.ledger import SEP, Charge, Ledger, LedgerPolicy
from gateway.metering.pipe import RedisPipe
from gateway.metering.pricing import ModelPrice, Tokens
from tests.fakes.upstream import Script
from tests.metered import ADMIN_KEY, MSG, auth, chat, create_key, fleet, records
from tests.wait import eventually

GPT4 = ModelPrice(30_000_000, 60_000_000, 30_000_000, 30_000_000)


def _charge(cid: str, ts_ms: int, key_id: str, pt: int, ct: int, cost: int) -> Charge:
    rec = {
        "id": cid,
        "ts": ts_ms,
        "tenant": "acme",
        "workflow": None,
        "tier": "T0",
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "cost_micros": cost,
        "reference_cost_micros": GPT4.cost(Tokens(pt, ct)),
        "estimated": False,
    }
    return Charge(
        cid,
        ts_ms,
        "acme",
        key_id,
        key_state=True,
        cost_micros=cost,
        minute=ts_ms // 60_000,
        record=rec,
        group=SEP.join(["T0", "a/m0", "", ""]),
    )


async def _totals(r: Redis, key_id: str, day: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for k, v in (await r.hgetall(KeyKeys(key_id).counters(day))).items():
        metric = k.decode().rsplit(SEP, 1)[1]
        totals[metric] = totals.get(metric, 0) + int(v)
    return totals


def test_replayed_charge_moves_counters_once(redis_url) -> None:
    now = int(time.time() * 1000)
    c = _charge("charge-1", now, "k1", 12, 34, 567)

    async def go() -> tuple[list[list[int]], dict[str, int], int]:
        r = Redis.from_url(redis_url)
        pipe = RedisPipe(redis_url, 5.0)
        try:
            ledger = Ledger(pipe, LedgerPolicy())
            await ledger.load_scripts()
            results = await asyncio.gather(*(ledger.apply([Charge.from_json(c.to_json())]) for _ in range(100)))
            spent = int(await r.hget(KeyKeys("k1").record, "spent_d"))
            return results, {**await _totals(r, "k1", day_of(now)), "spent": spent}, await r.xlen(KeyKeys("k1").stream)
        finally:
            pipe.close()
            await r.aclose()

    results, totals, stream_len = asyncio.run(go())
    assert sorted(results) == [[0]] * 99 + [[1]]
    assert totals == {"req": 1, "pt": 12, "ct": 34, "cost": 567, "ref": GPT4.cost(Tokens(12, 34)), "spent": 567}
    assert stream_len == 1


def test_ten_thousand_charges_sum_exactly(redis_url) -> None:
    # gpt-4o-mini's prices are fractions of a micro-dollar per token: where float sums drift.
    price = ModelPrice(150_000, 600_000, 75_000, 150_000)
    rnd = random.Random(7)
    now = int(time.time() * 1000)
    tokens = [Tokens(rnd.randint(1, 5000), rnd.randint(1, 2000)) for _ in range(10_000)]
    costs = [price.cost(t) for t in tokens]
    # Each cost is the exact rational cost rounded up, never below it and less than one micro-dollar above.
    for t, c in zip(tokens[:500], costs[:500], strict=True):
        exact = Fraction(t.prompt * 150_000 + t.completion * 600_000, 1_000_000)
        assert exact <= c < exact + 1
    charges = [
        _charge(f"c{i}", now, "k1", t.prompt, t.completion, c)
        for i, (t, c) in enumerate(zip(tokens, costs, strict=True))
    ]

    async def go() -> dict[str, int]:
        r = Redis.from_url(redis_url)
        pipe = RedisPipe(redis_url, 5.0)
        try:
            ledger = Ledger(pipe, LedgerPolicy())
            await ledger.load_scripts()
            await asyncio.gather(*(ledger.apply(charges[i : i + 250]) for i in range(0, 10_000, 250)))
            return await _totals(r, "k1", day_of(now))
        finally:
            pipe.close()
            await r.aclose()

    totals = asyncio.run(go())
    assert totals["req"] == 10_000
    assert totals["cost"] == sum(costs)
    assert totals["pt"] == sum(t.prompt for t in tokens) and totals["ct"] == sum(t.completion for t in tokens)


def test_stream_and_non_stream_cost_the_same(metered, upstreams, redis_url) -> None:
    upstreams["a"].default = Script(prompt_tokens=11, completion_tokens=7)
    key, _ = create_key(redis_url, "acme")
    gw = metered(fleet(upstreams, default_tier="T1"))
    client = openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key=key,
        max_retries=0,
        default_headers={"X-QLP-Workflow-Id": "parity", "X-QLP-Tier": "T0"},
    )
    client.chat.completions.create(model="qlp-t0", messages=MSG)  # type: ignore[arg-type]
    list(client.chat.completions.create(model="qlp-t0", messages=MSG, stream=True))  # type: ignore[arg-type]
    plain, streamed = sorted(records(gw, key, "parity", 2), key=lambda r: r["stream"])
    assert (plain["stream"], streamed["stream"]) == (False, True)
    for rec in (plain, streamed):
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (11, 7, False)
    assert plain["cost_micros"] == streamed["cost_micros"] == 7  # T0: 1 micro-USD per output token
    assert plain["reference_cost_micros"] == streamed["reference_cost_micros"] == GPT4.cost(Tokens(11, 7))


def test_disconnect_mid_stream_is_charged(metered, upstreams, redis_url) -> None:
    upstreams["a"].push(Script(n_chunks=200, chunk_delay=0.02))
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers={**auth(key), "X-QLP-Workflow-Id": "gone"},
        json={"model": "qlp-t0", "messages": MSG, "stream": True},
    ) as r:
        it = r.iter_bytes()
        next(it)
        next(it)
    assert upstreams["a"].disconnected.wait(5)
    (rec,) = records(gw, key, "gone", 1)
    assert rec["status"] == 499 and rec["estimated"] is True
    assert 1 <= rec["completion_tokens"] < 200 and rec["cost_micros"] >= 1


def test_stream_without_usage_is_estimated_never_zero(metered, upstreams, redis_url) -> None:
    upstreams["a"].push(Script(n_chunks=5, usage_in_stream=False), Script(n_chunks=5, cut_after=4))
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    for _ in range(2):
        with httpx.stream(
            "POST",
            gw.url + "/v1/chat/completions",
            headers={**auth(key), "X-QLP-Workflow-Id": "est"},
            json={"model": "qlp-t0", "messages": MSG, "stream": True},
        ) as r:
            r.read()
    no_usage, broken = sorted(records(gw, key, "est", 2), key=lambda r: r["status"])
    assert no_usage["status"] == 200 and broken["status"] == 502  # the second ended with an in-band error
    for rec in (no_usage, broken):
        assert rec["estimated"] is True and rec["completion_tokens"] >= 1 and rec["prompt_tokens"] >= 1
        assert rec["cost_micros"] >= 1
    assert no_usage["completion_tokens"] >= 5  # one per content event relayed, at least


def test_non_stream_without_usage_is_estimated_from_the_text(metered, upstreams, redis_url) -> None:
    upstreams["a"].push(Script(usage_in_body=False, content="x" * 400))
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    assert chat(gw, key, **{"X-QLP-Workflow-Id": "nousage"}).status_code == 200
    (rec,) = records(gw, key, "nousage", 1)
    assert rec["estimated"] is True and rec["completion_tokens"] == 100 and rec["cost_micros"] == 100


def test_record_carries_the_ledger_contract(metered, upstreams, redis_url) -> None:
    key, info = create_key(redis_url, "acme")
    gw = metered()
    r = chat(gw, key, **{"X-QLP-Workflow-Id": "wf-1", "X-QLP-Agent": "developer", "X-Request-Id": "req-42"})
    assert r.status_code == 200
    (rec,) = records(gw, key, "wf-1", 1)
    assert rec["request_id"] == "req-42" and rec["tenant"] == "acme" and rec["key_id"] == info.id
    assert (rec["workflow"], rec["agent"], rec["tier"], rec["backend"], rec["model"]) == (
        "wf-1",
        "developer",
        "T0",
        "a",
        "m0",
    )
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["status"], rec["estimated"]) == (5, 3, 200, False)
    assert rec["cost_micros"] == 3 and rec["reference_cost_micros"] == 5 * 30 + 3 * 60
    assert rec["reference_model"] == "gpt-4" and rec["fallback"] == ["T0"] and rec["latency_ms"] >= 0
    assert isinstance(rec["ts"], int) and rec["time"].endswith("Z")


def test_fallback_is_booked_at_the_serving_tiers_price(metered, upstreams, redis_url) -> None:
    upstreams["a"].push(Script(status=500))
    key, _ = create_key(redis_url, "acme")
    cfg = fleet(upstreams)
    cfg["tiers"]["T0"]["fallback"] = ["T1"]
    gw = metered(cfg)
    assert chat(gw, key, **{"X-QLP-Workflow-Id": "fb"}).status_code == 200
    (rec,) = records(gw, key, "fb", 1)
    assert (rec["requested_tier"], rec["tier"], rec["fallback"]) == ("T0", "T1", ["T0", "T1"])
    assert rec["cost_micros"] == 5 * 2 + 3 * 4  # T1's price


def test_reused_request_id_is_charged_each_time(metered, upstreams, redis_url) -> None:
    # The client's X-Request-Id is correlation, not the charge's idempotency key: reusing it must not
    # make the second request free.
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    for _ in range(2):
        assert chat(gw, key, **{"X-Request-Id": "same", "X-QLP-Workflow-Id": "dup"}).status_code == 200
    recs = records(gw, key, "dup", 2)
    assert [r["request_id"] for r in recs] == ["same", "same"] and recs[0]["id"] != recs[1]["id"]


def _traffic(gw: Any, key: str) -> None:
    for agent, wf, tier in [
        ("developer", "w1", "T0"),
        ("developer", "w1", "T1"),
        ("test", "w2", "T0"),
        (None, None, "T0"),
    ]:
        h = {
            "X-QLP-Tier": tier,
            **({"X-QLP-Agent": agent} if agent else {}),
            **({"X-QLP-Workflow-Id": wf} if wf else {}),
        }
        assert chat(gw, key, **h).status_code == 200


def test_summary_groups_add_up_to_the_total(metered, upstreams, redis_url) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    _traffic(gw, key)

    def summary(group_by: str) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(
            gw.url + "/v1/ledger/summary", params={"group_by": group_by}, headers=auth(key)
        ).json()
        return doc

    eventually(lambda: summary("tier")["total"]["requests"] == 4, what="4 requests booked")
    by = {g: {row["group"]: row for row in summary(g)["data"]} for g in ("tier", "model", "agent", "workflow", "day")}
    assert {k: v["requests"] for k, v in by["tier"].items()} == {"T0": 3, "T1": 1}
    assert {k: v["cost_micros"] for k, v in by["tier"].items()} == {"T0": 9, "T1": 22}
    assert {k: v["requests"] for k, v in by["model"].items()} == {"a/m0": 3, "b/m1": 1}
    assert {k: v["requests"] for k, v in by["agent"].items()} == {"developer": 2, "test": 1, "(none)": 1}
    assert {k: v["cost_micros"] for k, v in by["workflow"].items()} == {"w1": 25, "w2": 3, "(none)": 3}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    total = summary("tier")["total"]
    assert by["day"][today]["cost_micros"] == total["cost_micros"] == 31
    assert total["reference_cost_micros"] == 4 * 330 and total["savings_micros"] == 4 * 330 - 31
    assert total["cost_usd"] == "0.000031"
    wf = httpx.get(gw.url + "/v1/ledger/workflows/w1", headers=auth(key)).json()
    assert wf["requests"] == 2 and wf["cost_micros"] == 25 and [r["tier"] for r in wf["records"]] == ["T0", "T1"]
    bad = httpx.get(gw.url + "/v1/ledger/summary", params={"since": "yesterday"}, headers=auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_value"


def test_names_with_commas_are_booked_as_sent(metered, upstreams, redis_url) -> None:
    """CHARGE takes a charge's fields comma-separated with its group (tier, model, agent, workflow) last:
    an agent or workflow name with commas in it must come back whole."""
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    for agent, wf in (("dev,ops", "wf,1,2"), ("dev,ops", "wf,1,2"), ("plain", "w")):
        assert chat(gw, key, **{"X-QLP-Agent": agent, "X-QLP-Workflow-Id": wf}).status_code == 200

    def by(group_by: str) -> dict[str, int]:
        doc = httpx.get(gw.url + "/v1/ledger/summary", params={"group_by": group_by}, headers=auth(key)).json()
        return {row["group"]: row["requests"] for row in doc["data"]}

    assert eventually(lambda: by("agent") == {"dev,ops": 2, "plain": 1}, what="agents booked whole")
    assert by("workflow") == {"wf,1,2": 2, "w": 1}
    assert [r["agent"] for r in records(gw, key, "wf,1,2", 2)] == ["dev,ops", "dev,ops"]


def test_ledger_cli_prints_tables_and_exports_csv_and_jsonl(metered, upstreams, redis_url, tmp_path) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    _traffic(gw, key)
    eventually(
        lambda: httpx.get(gw.url + "/v1/ledger/summary", headers=auth(ADMIN_KEY)).json()["total"]["requests"] == 4
    )
    out = io.StringIO()
    assert ledger_cli.main(["--redis-url", redis_url, "summary", "--by", "tier"], out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1].split()[:2] == ["GROUP", "REQUESTS"]
    assert lines[2].split()[:2] == ["T0", "3"] and lines[-1].split()[:2] == ["total", "4"]
    out = io.StringIO()
    assert ledger_cli.main(["--redis-url", redis_url, "workflow", "w1"], out) == 0
    assert "workflow w1 (tenant acme)" in out.getvalue()
    out = io.StringIO()
    assert ledger_cli.main(["--redis-url", redis_url, "export", "--format", "jsonl", "--tenant", "acme"], out) == 0
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(recs) == 4 and sum(r["cost_micros"] for r in recs) == 31
    path = tmp_path / "ledger.csv"
    assert ledger_cli.main(["--redis-url", redis_url, "export", "--format", "csv", "-o", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 4 and {r["fallback"] for r in rows} == {"T0", "T1"}
    assert sum(int(r["cost_micros"]) for r in rows) == 31
    assert (
        ledger_cli.main(
            ["--redis-url", redis_url, "export", "--since", "2000-01-01", "--until", "2000-01-02"], io.StringIO()
        )
        == 0
    )
