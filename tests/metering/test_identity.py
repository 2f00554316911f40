"""API keys: 401 for missing, wrong and revoked keys; 403 for routes a key may not use; keys stored hashed;
tenant isolation of the ledger."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from gateway.metering import keys_cli
from tests.metered import ADMIN_KEY, MSG, auth, chat, create_key, records, run


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code


def test_missing_key_is_401_and_never_reaches_the_upstream(metered, upstreams) -> None:
    gw = metered()
    assert_error(chat(gw, None), 401, "missing_api_key")
    assert_error(chat(gw, None, Authorization="Basic dXNlcjpwYXNz"), 401, "missing_api_key")
    assert not upstreams["a"].requests


def test_wrong_key_is_401(metered, upstreams, redis_url) -> None:
    create_key(redis_url, "acme")
    gw = metered()
    assert_error(chat(gw, "qlp-not-a-real-key"), 401, "invalid_api_key")
    assert not upstreams["a"].requests


def test_wrong_key_with_the_official_client_raises_authentication_error(metered, redis_url) -> None:
    gw = metered()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="qlp-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="qlp-t0", messages=MSG)  # type: ignore[arg-type]


def test_revoked_key_is_401(metered, redis_url, capsys) -> None:
    key, info = create_key(redis_url, "acme")
    gw = metered()
    assert chat(gw, key).status_code == 200
    assert keys_cli.main(["--redis-url", redis_url, "revoke", info.id]) == 0
    assert_error(chat(gw, key), 401, "invalid_api_key")
    assert_error(httpx.get(gw.url + "/v1/ledger/summary", headers=auth(key)), 401)


def test_keys_are_stored_only_as_sha256(redis_url) -> None:
    key, info = create_key(redis_url, "acme")

    async def dump(r):  # type: ignore[no-untyped-def]
        out = []
        async for k in r.scan_iter():
            out.append(k)
            t = await r.type(k)
            if t == b"hash":
                out += [*(await r.hgetall(k)).keys(), *(await r.hgetall(k)).values()]
            elif t == b"set":
                out += list(await r.smembers(k))
        return out

    everything = b" ".join(run(dump, redis_url))
    assert key.encode() not in everything and key.split("-", 1)[1].encode() not in everything
    assert info.id.encode() in everything


def test_tenant_key_on_admin_route_is_403(metered, redis_url) -> None:
    key, _ = create_key(redis_url, "acme")
    gw = metered()
    assert_error(httpx.get(gw.url + "/v1/admin/keys", headers=auth(key)), 403, "admin_only")
    assert_error(httpx.post(gw.url + "/v1/admin/keys", headers=auth(key), json={"tenant": "acme"}), 403)
    assert_error(httpx.get(gw.url + "/v1/admin/keys"), 401)


def test_tenant_cannot_read_another_tenants_ledger(metered, redis_url) -> None:
    key_a, _ = create_key(redis_url, "tenant-a")
    key_b, _ = create_key(redis_url, "tenant-b")
    gw = metered()
    assert chat(gw, key_b, **{"X-QLP-Workflow-Id": "wf-b"}).status_code == 200
    records(gw, key_b, "wf-b", 1)
    # A's key: B's tenant is forbidden, B's workflow does not exist for A, and A's own summary is empty.
    assert_error(httpx.get(gw.url + "/v1/ledger/summary", params={"tenant": "tenant-b"}, headers=auth(key_a)), 403)
    assert_error(httpx.get(gw.url + "/v1/ledger/workflows/wf-b", headers=auth(key_a)), 404)
    assert_error(
        httpx.get(gw.url + "/v1/ledger/workflows/wf-b", params={"tenant": "tenant-b"}, headers=auth(key_a)), 403
    )
    own = httpx.get(gw.url + "/v1/ledger/summary", headers=auth(key_a)).json()
    assert own["tenants"] == ["tenant-a"] and own["total"]["requests"] == 0
    theirs = httpx.get(gw.url + "/v1/ledger/summary", headers=auth(key_b)).json()
    assert theirs["total"]["requests"] == 1


def test_admin_key_sees_every_tenant_and_manages_keys(metered, redis_url) -> None:
    key_a, _ = create_key(redis_url, "tenant-a")
    key_b, _ = create_key(redis_url, "tenant-b")
    gw = metered()
    for k in (key_a, key_b):
        assert chat(gw, k, **{"X-QLP-Workflow-Id": "wf"}).status_code == 200
    records(gw, key_a, "wf", 1)
    records(gw, key_b, "wf", 1)
    s = httpx.get(gw.url + "/v1/ledger/summary", params={"group_by": "tenant"}, headers=auth(ADMIN_KEY)).json()
    by_tenant = {row["group"]: row["requests"] for row in s["data"]}
    assert by_tenant["tenant-a"] == 1 and by_tenant["tenant-b"] == 1
    created = httpx.post(
        gw.url + "/v1/admin/keys",
        headers=auth(ADMIN_KEY),
        json={"tenant": "tenant-c", "budget_day_usd": "1.50", "requests_per_minute": 10},
    )
    assert created.status_code == 201, created.text
    doc = created.json()
    assert doc["limits"]["budget_day_micros"] == 1_500_000 and doc["key"].startswith("qlp-")
    assert chat(gw, doc["key"]).status_code == 200
    listed = httpx.get(gw.url + "/v1/admin/keys", headers=auth(ADMIN_KEY)).json()["data"]
    assert {k["tenant"] for k in listed} == {"tenant-a", "tenant-b", "tenant-c"}
    assert all("key" not in k and "sha256" not in k for k in listed)
    assert httpx.delete(f"{gw.url}/v1/admin/keys/{doc['id']}", headers=auth(ADMIN_KEY)).status_code == 200
    assert_error(chat(gw, doc["key"]), 401)


def test_keys_cli_creates_lists_and_revokes(redis_url, capsys) -> None:
    assert (
        keys_cli.main(
            [
                "--redis-url",
                redis_url,
                "create",
                "--tenant",
                "acme",
                "--name",
                "ci",
                "--budget-day",
                "5",
                "--rpm",
                "60",
                "--json",
            ]
        )
        == 0
    )
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("qlp-") and created["limits"]["budget_day_micros"] == 5_000_000
    assert keys_cli.main(["--redis-url", redis_url, "list"]) == 0
    table = capsys.readouterr().out
    assert created["id"] in table and "5.000000" in table and created["key"] not in table
    assert keys_cli.main(["--redis-url", redis_url, "revoke", created["id"]]) == 0
    assert created["id"] in capsys.readouterr().out
    assert keys_cli.main(["--redis-url", redis_url, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked"] is True
    assert keys_cli.main(["--redis-url", redis_url, "revoke", "0000000000000000"]) == 1
    assert keys_cli.main(["--redis-url", redis_url, "create", "--tenant", "bad{tag}"]) == 2


def test_bootstrap_admin_key_is_served_and_booked_under_tenant_admin(metered, upstreams, redis_url) -> None:
    gw = metered()
    assert chat(gw, ADMIN_KEY, **{"X-QLP-Workflow-Id": "ops"}).status_code == 200
    doc = records(gw, ADMIN_KEY, "ops", 1)[0]
    assert doc["tenant"] == "admin" and doc["key_id"] is None and doc["cost_micros"] == 3
    s = httpx.get(gw.url + "/v1/ledger/summary", params={"tenant": "admin"}, headers=auth(ADMIN_KEY)).json()
    assert s["total"]["requests"] == 1
