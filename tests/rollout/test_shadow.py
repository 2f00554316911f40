"""Shadow traffic: a share of T3's requests mirrored to a local tier; the caller never sees the shadow's
answer and the tenant is never billed for it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import orjson
from redis.asyncio import Redis

from gateway.rollout.shadow import SHADOW_STREAM
from tests.fakes.upstream import Script
from tests.metered import MSG, auth, create_key, records, run
from tests.rollout.conftest import fleet3
from tests.wait import eventually

SHADOW = {"T3/developer": {"shadow": {"tier": "T0", "adapter": "dev-v2", "share": 1.0}}}


def _shadow_records(redis_url: str) -> list[dict[str, Any]]:
    async def read(r: Redis) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"r"]) for _, f in await r.xrange(SHADOW_STREAM)]

    out: list[dict[str, Any]] = run(read, redis_url)
    return out


def test_shadow_answers_never_reach_the_caller_nor_the_tenants_bill(upstreams, metered, redis_url) -> None:
    upstreams["c"].default = Script(content="from-gpt4")
    upstreams["a"].default = Script(content="from-local", prompt_tokens=7, completion_tokens=11)
    gw = metered(fleet3(upstreams, rollouts=SHADOW))
    key, info = create_key(redis_url, "acme")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    headers = {"X-QLP-Tier": "T3", "X-QLP-Agent": "developer", "X-QLP-Workflow-Id": "wf-s"}
    answer = client.chat.completions.create(model="gpt-4", messages=MSG, extra_headers=headers)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="gpt-4", messages=MSG, stream=True, extra_headers=headers)
        if c.choices
    )
    assert answer.choices[0].message.content == "from-gpt4"
    assert streamed.startswith("from-gpt4") and "from-local" not in streamed

    shadows = eventually(
        lambda: len(_shadow_records(redis_url)) == 2 and _shadow_records(redis_url), what="two shadow records"
    )
    sent = [r["body"] for r in upstreams["a"].requests]
    assert [b["model"] for b in sent] == ["dev-v2", "dev-v2"]
    assert not any(b.get("stream") for b in sent)  # mirrored without streaming, even a streamed request
    assert {(s["tier"], s["source_tier"], s["model"], s["status"]) for s in shadows} == {("T0", "T3", "dev-v2", 200)}
    assert all(s["tenant"] == "acme" and s["completion_tokens"] == 11 and s["cost_micros"] == 11 for s in shadows)

    # The tenant's ledger holds the two T3 requests and nothing else.
    recs = records(gw, key, "wf-s", 2)
    assert [r["tier"] for r in recs] == ["T3", "T3"] and len(recs) == 2
    summary = httpx.get(gw.url + "/v1/ledger/summary?group_by=tier", headers=auth(key)).json()
    assert [row["group"] for row in summary["data"]] == ["T3"] and summary["total"]["requests"] == 2
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'qlp_shadow_requests_total{backend="a",result="ok",tier="T0"} 2.0' in metrics
    assert info.tenant == "acme"


def test_only_the_configured_share_is_mirrored(upstreams, metered, redis_url) -> None:
    shadow = {"T3/*": {"shadow": {"tier": "T0", "share": 0.25}}}
    gw = metered(fleet3(upstreams, rollouts=shadow))
    key, _ = create_key(redis_url, "acme")

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=20) as c:
            await asyncio.gather(
                *(
                    c.post(
                        gw.url + "/v1/chat/completions", json={"model": "qlp-t3", "messages": MSG}, headers=auth(key)
                    )
                    for _ in range(200)
                )
            )

    asyncio.run(burst())
    n = eventually(
        lambda: len(_shadow_records(redis_url)) > 20 and len(_shadow_records(redis_url)), what="shadow records"
    )
    assert len(upstreams["c"].requests) == 200
    assert 20 <= n <= 80, n  # 25% of 200, give or take, and never more than the mirror bound allows


def test_a_failing_shadow_changes_nothing_for_the_caller(upstreams, metered, redis_url) -> None:
    upstreams["a"].default = Script(status=500)
    gw = metered(fleet3(upstreams, rollouts=SHADOW))
    key, _ = create_key(redis_url, "acme")
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "gpt-4", "messages": MSG},
        headers={**auth(key), "X-QLP-Tier": "T3", "X-QLP-Agent": "developer"},
    )
    assert r.status_code == 200
    rec = eventually(lambda: _shadow_records(redis_url), what="the shadow record")[0]
    assert rec["status"] >= 500 and rec["cost_micros"] == 0
