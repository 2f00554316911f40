"""Rollouts through a real gateway and Redis: arms chosen per workflow, booked with their arm, and changed
at run time through the admin API, in every process, without a restart."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import openai
import pytest

from tests.metered import ADMIN_KEY, MSG, auth, create_key, records
from tests.rollout.conftest import fleet3
from tests.wait import eventually

ROLLOUT = {
    "arms": [{"name": "v1", "adapter": "dev-v1", "weight": 50}, {"name": "v2", "adapter": "dev-v2", "weight": 50}]
}


def _client(gw: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def _ask(client: openai.OpenAI, workflow: str, agent: str = "developer", tier: str = "T0") -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="qlp-t0",
        messages=MSG,
        extra_headers={"X-QLP-Agent": agent, "X-QLP-Workflow-Id": workflow, "X-QLP-Tier": tier},
    )
    return raw.headers["x-qlp-backend"], raw.parse().model


def _admin(gw: Any, method: str, path: str, body: Any = None, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.request(method, gw.url + path, json=body, headers=auth(key), timeout=10)


def test_each_workflow_sticks_to_its_arm_and_the_ledger_names_it(upstreams, metered, redis_url) -> None:
    gw = metered(fleet3(upstreams, rollouts={"T0/developer": ROLLOUT}))
    key, _ = create_key(redis_url, "acme")
    client = _client(gw, key)
    seen: dict[str, set[str]] = {}
    for i in range(12):
        for _ in range(3):
            backend, _ = _ask(client, f"wf-{i}")
            seen.setdefault(f"wf-{i}", set()).add(backend)
    assert all(len(v) == 1 for v in seen.values()), seen  # sticky
    assert {next(iter(v)) for v in seen.values()} == {"a/dev-v1", "a/dev-v2"}  # both arms used
    sent = Counter(r["body"]["model"] for r in upstreams["a"].requests)
    assert set(sent) == {"dev-v1", "dev-v2"} and sum(sent.values()) == 36
    recs = records(gw, key, "wf-0", 3)
    arm = {"a/dev-v1": "v1", "a/dev-v2": "v2"}[next(iter(seen["wf-0"]))]
    assert [r["arm"] for r in recs] == [arm] * 3
    assert all(r["model"] == f"dev-{arm}" and r["requested_tier"] == "T0" for r in recs)


def test_other_agents_and_requests_without_one_keep_the_usual_routing(upstreams, metered, redis_url) -> None:
    gw = metered(fleet3(upstreams, rollouts={"T0/developer": ROLLOUT}))
    key, _ = create_key(redis_url, "acme")
    assert _ask(_client(gw, key), "wf-x", agent="architect")[0] == "a/m0"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qlp-t0", "messages": MSG}, headers=auth(key))
    assert r.headers["x-qlp-backend"] == "a/m0"


@pytest.mark.parametrize("store", ["redis", "cluster"])
def test_a_weight_change_takes_effect_without_a_restart_in_every_process(
    upstreams, metered, request: pytest.FixtureRequest, store: str
) -> None:
    redis_url = request.getfixturevalue("redis_url" if store == "redis" else "cluster_url")
    gw = metered(fleet3(upstreams), redis_url=redis_url)
    other = metered(fleet3(upstreams), redis_url=redis_url)  # a second gateway process on the same Redis
    key, _ = create_key(redis_url, "acme")
    workflows = [f"wf-{i}" for i in range(20)]
    assert {_ask(_client(gw, key), wf)[0] for wf in workflows} == {"a/m0"}

    r = _admin(
        gw, "PUT", "/v1/admin/rollouts/T0/developer", {"arms": [{"name": "v2", "adapter": "dev-v2", "weight": 1}]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "runtime"
    assert {_ask(_client(gw, key), wf)[0] for wf in workflows} == {"a/dev-v2"}  # this process: at once
    eventually(lambda: _ask(_client(other, key), "wf-0")[0] == "a/dev-v2", what="the other process to reload")
    assert {_ask(_client(other, key), wf)[0] for wf in workflows} == {"a/dev-v2"}

    assert _admin(gw, "DELETE", "/v1/admin/rollouts/T0/developer").status_code == 200
    assert {_ask(_client(gw, key), wf)[0] for wf in workflows} == {"a/m0"}
    assert _admin(gw, "DELETE", "/v1/admin/rollouts/T0/developer").status_code == 404


def test_publishing_a_canary_sends_its_share_of_workflows_to_the_new_adapter(upstreams, metered, redis_url) -> None:
    gw = metered(fleet3(upstreams))
    key, _ = create_key(redis_url, "acme")
    r = _admin(gw, "POST", "/v1/admin/routes", {"tier": "T0", "agent": "developer", "adapter": "dev-v9", "weight": 25})
    assert r.status_code == 200, r.text
    assert [(a["name"], a["weight"]) for a in r.json()["arms"]] == [("baseline", 75.0), ("dev-v9", 25.0)]
    counts = Counter(_ask(_client(gw, key), f"wf-{i}")[0] for i in range(200))
    assert set(counts) == {"a/m0", "a/dev-v9"}
    assert 0.15 < counts["a/dev-v9"] / 200 < 0.35
    listed = _admin(gw, "GET", "/v1/admin/rollouts").json()["data"]
    assert [(x["tier"], x["agent"]) for x in listed] == [("T0", "developer")]


def test_an_arm_may_send_workflows_to_t3(upstreams, metered, redis_url) -> None:
    rollout = {"arms": [{"name": "gpt4", "tier": "T3", "weight": 1}]}
    gw = metered(fleet3(upstreams, rollouts={"T0/*": rollout}))
    key, _ = create_key(redis_url, "acme")
    backend, _ = _ask(_client(gw, key), "wf-1", agent="test")
    assert backend == "c/gpt-4" and upstreams["c"].requests and not upstreams["a"].requests
    (rec,) = records(gw, key, "wf-1", 1)
    assert (rec["tier"], rec["requested_tier"], rec["arm"]) == ("T3", "T0", "gpt4")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"arms": [{"name": "x", "weight": 1, "tier": "T7"}]}, "unknown tier"),
        ({"arms": [{"name": "x", "weight": 0}]}, "add up to 0"),
        ({"arms": [{"name": "x", "weight": 1}, {"name": "x", "weight": 1}]}, "twice"),
        ({"shadow": {"tier": "T0", "share": 0.5}}, "must differ"),
        ({"arms": [{"name": "x", "weight": -1}]}, "weight"),
        ({"arms": [], "extra": 1}, "extra"),
    ],
)
def test_an_invalid_rollout_is_refused_and_changes_nothing(upstreams, metered, body, fragment) -> None:
    gw = metered(fleet3(upstreams))
    r = _admin(gw, "PUT", "/v1/admin/rollouts/T0/developer", body)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    assert _admin(gw, "GET", "/v1/admin/rollouts").json()["data"] == []


def test_only_an_admin_key_changes_rollouts(upstreams, metered, redis_url) -> None:
    gw = metered(fleet3(upstreams))
    key, _ = create_key(redis_url, "acme")
    r = _admin(gw, "PUT", "/v1/admin/rollouts/T0/developer", ROLLOUT, key=key)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
    assert (
        _admin(gw, "POST", "/v1/admin/routes", {"tier": "T0", "agent": "d", "adapter": "x"}, key="nope").status_code
        == 401
    )
