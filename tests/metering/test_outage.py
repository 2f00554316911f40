"""Redis down: charges are spooled to disk and replayed when it returns; admission fails closed or open."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.metering.layout import KeyKeys
from gateway.metering.ledger import Charge
from gateway.metering.spool import Spool
from tests.fakes.gateway import free_port
from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import Script
from tests.metered import MSG, auth, chat, create_key, ledger_totals
from tests.wait import eventually


def stream(gw: Any, key: str) -> int:
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        headers=auth(key),
        timeout=30,
        json={"model": "qlp-t0", "messages": MSG, "stream": True},
    ) as r:
        r.read()
        return r.status_code


def test_redis_killed_mid_run_ledger_equals_upstream_usage_after_replay(metered, upstreams, tmp_path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        key, info = create_key(server.url, "acme")
        gw = metered(redis_url=server.url, admission_when_redis_down="open", spool_replay_interval=0.05)
        usage = [(10 + i, 1 + i) for i in range(25)]  # (prompt, completion) the upstream reports
        scripts = [Script(prompt_tokens=p, completion_tokens=c, n_chunks=4, chunk_delay=0.05) for p, c in usage]
        upstreams["a"].push(*scripts)
        # 1. Redis up.
        for _ in range(10):
            assert chat(gw, key).status_code == 200
        # 2. Five streams admitted while Redis is up; it dies while they are being served.
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            inflight = [pool.submit(stream, gw, key) for _ in range(5)]
            eventually(lambda: len(upstreams["a"].requests) == 15, what="5 streams in flight")
            server.kill()
            assert [f.result() for f in inflight] == [200] * 5
        # 3. Ten more while Redis is down: admitted (fail open, a key seen before), charged to the spool.
        for i in range(10):
            assert (stream(gw, key) if i % 2 else chat(gw, key).status_code) == 200
        ready = httpx.get(gw.url + "/readyz").json()["ledger"]
        assert ready["redis"] == "down" and ready["spool_depth"] >= 10 and ready["admitted_without_redis"] == 10
        # 4. Redis back (same port, its append-only file reloaded): the spool is replayed exactly once.
        server.start()
        with server.client() as c:
            eventually(lambda: ledger_totals(c, info.id)["req"] == 25, what="25 requests in the ledger")
            eventually(
                lambda: httpx.get(gw.url + "/readyz").json()["ledger"]["spool_depth"] == 0, what="an empty spool"
            )
            totals = ledger_totals(c, info.id)
            assert totals == {
                "req": 25,
                "pt": sum(p for p, _ in usage),
                "ct": sum(ct for _, ct in usage),
                "cost": sum(ct for _, ct in usage),
            }  # T0: 1 micro-USD per output token
            assert c.xlen(KeyKeys(info.id).stream) == 25
    finally:
        server.stop()


def test_fail_closed_is_503_while_redis_is_down(metered, upstreams) -> None:
    gw = metered(redis_url=f"redis://127.0.0.1:{free_port()}/0", admission_when_redis_down="closed")
    r = chat(gw, "qlp-any-key")
    assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable" and r.headers["retry-after"]
    assert not upstreams["a"].requests
    assert chat(gw, None).status_code == 401  # a missing key is still a missing key


def test_startup_with_redis_down_works_and_readyz_says_so(metered, upstreams, tmp_path) -> None:
    port = free_port()
    gw = metered(redis_url=f"redis://127.0.0.1:{port}/0", spool_replay_interval=0.05)
    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 503 and r.json()["ledger"]["redis"] == "down"
    assert r.json()["ledger"]["admission_when_redis_down"] == "closed"
    server = RedisServer(tmp_path / "redis", port=port).start()
    try:
        key, _ = create_key(server.url, "acme")
        eventually(lambda: httpx.get(gw.url + "/readyz").status_code == 200, what="ready once Redis answers")
        assert chat(gw, key).status_code == 200
    finally:
        server.stop()


def test_fail_open_admits_known_keys_up_to_the_cap(metered, upstreams, tmp_path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        key, _ = create_key(server.url, "acme")
        stranger, _ = create_key(server.url, "other")
        gw = metered(redis_url=server.url, admission_when_redis_down="open", fail_open_cap=2)
        assert chat(gw, key).status_code == 200
        server.kill()
        assert [chat(gw, key).status_code for _ in range(3)] == [200, 200, 503]
        assert chat(gw, stranger).status_code == 503  # never verified by this process: not admitted
        assert httpx.get(gw.url + "/readyz").json()["ledger"]["admitted_without_redis"] == 2
    finally:
        server.stop()


def _charge(i: int) -> Charge:
    return Charge(f"c{i}", 1_700_000_000_000 + i, "acme", "k1", key_state=False, cost_micros=i, record={"id": f"c{i}"})


def test_spool_keeps_every_charge_across_processes_and_replays_each_once(tmp_path) -> None:
    path = tmp_path / "spool" / "ledger.jsonl"

    async def write() -> None:
        a, b = Spool(path), Spool(path)  # two processes sharing one spool path
        await asyncio.gather(*(s.append([_charge(i)]) for i, s in enumerate([a, b] * 100)))

    asyncio.run(write())
    with path.open("ab") as f:
        f.write(b'{"id": "torn')  # a process died mid-write: the torn tail is skipped, not fatal
    assert Spool(path).depth() == 200
    applied: list[str] = []

    async def apply(charges: list[Charge]) -> None:
        applied.extend(c.id for c in charges)

    async def replay_twice() -> tuple[int, int]:
        s1, s2 = Spool(path), Spool(path)
        return await s1.replay(apply), await s2.replay(apply)

    first, second = asyncio.run(replay_twice())
    assert (first, second) == (200, 0)
    assert sorted(applied) == sorted(f"c{i}" for i in range(200))
    assert not Spool(path).has_pending()


def test_spool_replay_cut_short_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"

    async def go() -> tuple[int, int]:
        s = Spool(path)
        for i in range(3):
            await s.append([_charge(i)])

        async def fail(_: list[Charge]) -> None:
            raise redis.ConnectionError("down again")

        try:
            await s.replay(fail)
        except redis.ConnectionError:
            pass
        kept = s.depth()
        seen: list[Charge] = []

        async def ok(charges: list[Charge]) -> None:
            seen.extend(charges)

        await s.replay(ok)
        return kept, len(seen)

    assert asyncio.run(go()) == (3, 3)


def test_redis_refusing_writes_spools_charges_until_it_accepts_them(metered, upstreams, tmp_path) -> None:
    # A Redis at its memory limit (noeviction) answers writes with OOM: not an outage of the connection,
    # but the charge must wait in the spool all the same, not be dropped.
    server = RedisServer(tmp_path / "redis").start()
    try:
        key, info = create_key(server.url, "acme")  # no limits: admission only reads
        gw = metered(redis_url=server.url, spool_replay_interval=0.05)
        with server.client() as c:
            c.config_set("maxmemory", 1)
            assert chat(gw, key).status_code == 200
            eventually(
                lambda: httpx.get(gw.url + "/readyz").json()["ledger"]["spool_depth"] == 1, what="a spooled charge"
            )
            assert ledger_totals(c, info.id)["req"] == 0
            c.config_set("maxmemory", 0)
            eventually(lambda: ledger_totals(c, info.id)["req"] == 1, what="the charge replayed")
    finally:
        server.stop()


def test_gateway_meters_over_the_redis_unix_socket(metered, upstreams, tmp_path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        key, info = create_key(server.url, "acme", tpm=10_000)
        gw = metered(redis_url=server.unix_url)
        assert chat(gw, key).status_code == 200
        with server.client() as c:
            eventually(lambda: ledger_totals(c, info.id) == {"req": 1, "pt": 5, "ct": 3, "cost": 3})
    finally:
        server.stop()


def test_charges_waiting_for_a_replica_never_hold_up_requests(metered, upstreams, redis_url) -> None:
    """QLP_REDIS_WAIT_REPLICAS=1 on a Redis without replicas: every WAIT runs to its timeout (2 s here).
    Requests must not queue behind those WAITs (bookings have their own connection), and every charge is
    still booked once: on the master, and spooled until a replica holds it."""
    key, info = create_key(redis_url, "acme")
    gw = metered(redis_wait_replicas=1, redis_timeout=4.0, admission_lease_seconds=0, spool_replay_interval=0.2)
    usage = [(10 + i, 1 + i) for i in range(8)]
    upstreams["a"].push(*(Script(prompt_tokens=p, completion_tokens=c) for p, c in usage))
    for _ in usage:  # one at a time: each one's admission comes after the previous one's charge and WAIT
        r = chat(gw, key)
        assert r.status_code == 200, r.text
        assert r.elapsed.total_seconds() < 1.0, f"a request waited {r.elapsed.total_seconds():.2f} s"
    expected = {"req": len(usage), "pt": sum(p for p, _ in usage), "ct": sum(c for _, c in usage)}
    with redis.Redis.from_url(redis_url) as c:
        eventually(
            lambda: {k: v for k, v in ledger_totals(c, info.id).items() if k in expected} == expected,
            timeout=20,
            what="the charges on the master",
        )
