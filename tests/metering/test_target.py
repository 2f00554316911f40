"""QLP_REDIS_URL: one server, a Redis Cluster or a Sentinel-watched master, and clear errors otherwise."""

from __future__ import annotations

import re

import pytest

from gateway.metering.target import parse_redis_url


def test_one_server_keeps_its_database_and_credentials() -> None:
    t = parse_redis_url("rediss://app:s%40cret@redis.internal:6380/2")
    assert (t.kind, t.nodes, t.tls, t.username, t.password, t.db) == (
        "single", (("redis.internal", 6380),), True, "app", "s@cret", 2)  # fmt: skip
    assert "s@cret" not in repr(t) and "s@cret" not in t.describe()


def test_unix_socket() -> None:
    t = parse_redis_url("unix:///run/redis/redis.sock?db=3")
    assert (t.unix_path, t.db, t.nodes) == ("/run/redis/redis.sock", 3, ())


def test_a_cluster_is_its_seeds() -> None:
    t = parse_redis_url("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert t.kind == "cluster" and t.password == "pw"
    assert t.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))


def test_sentinel_names_its_service_and_database() -> None:
    t = parse_redis_url("redis+sentinel://s1:26379,s2/ledger/1?sentinel_password=x")
    assert (t.kind, t.service, t.db, t.sentinel_password) == ("sentinel", "ledger", 1, "x")
    assert t.nodes == (("s1", 26379), ("s2", 26379))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("memcached://x", "unsupported Redis URL scheme"),
        ("redis://a:1,b:2/0", "several hosts need redis+cluster"),
        ("redis+cluster://a:1/3", "only database 0"),
        ("redis+sentinel://a:1", "service name"),
        ("redis://a:port/0", "bad port"),
        ("rediss+sentinel://a/x", "unsupported Redis URL scheme"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_redis_url(url)
