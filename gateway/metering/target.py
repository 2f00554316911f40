"""Where Redis is: one server, a Redis Cluster, or a master watched by Sentinel, from `QLP_REDIS_URL`.

    redis://[user:password@]host:port/db           one server (rediss:// with TLS)
    unix:///run/redis.sock?db=0                    one server on this host, over its socket
    redis+cluster://[user:password@]h1:p1,h2:p2    a Redis Cluster: any reachable seed finds the rest
    redis+sentinel://[user:password@]h1:p1,h2:p2/service[/db][?sentinel_password=...]
                                                   the master Sentinel names for `service`, followed
                                                   through failovers

`rediss+cluster://` uses TLS to the cluster's nodes (Sentinel with TLS is not supported). The user and password are the data
nodes'; Sentinels with their own password take it as `sentinel_password`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisTarget", "parse_redis_url"]

Kind = Literal["single", "cluster", "sentinel"]
SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
}


@dataclass(frozen=True)
class RedisTarget:
    kind: Kind
    nodes: tuple[tuple[str, int], ...]  # the server, the cluster's seeds, or the Sentinels
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    unix_path: str | None = None
    service: str | None = None  # Sentinel's name of the master
    sentinel_password: str | None = field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.tls else None

    def describe(self) -> str:
        """For logs and errors: where, never the password."""
        where = self.unix_path or ",".join(f"{h}:{p}" for h, p in self.nodes)
        return {"single": where, "cluster": f"cluster {where}", "sentinel": f"sentinel {where} ({self.service})"}[
            self.kind
        ]


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [::1]:6379
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"Redis URL: no host in {part!r}")
        try:
            out.append((host, int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"Redis URL: bad port in {part!r}") from None
    if not out:
        raise ValueError("Redis URL: no host")
    return tuple(out)


def parse_redis_url(url: str) -> RedisTarget:
    u = urlsplit(url)
    if u.scheme not in SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {u.scheme!r} (redis://, rediss://, unix://, redis+cluster://, "
            "redis+sentinel://)"
        )
    kind, tls = SCHEMES[u.scheme]
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    creds, _, hosts = u.netloc.rpartition("@")
    user, _, password = creds.partition(":") if creds else ("", "", "")
    username = unquote(user) if user else None
    secret = unquote(password) if password else None
    if u.scheme == "unix":
        return RedisTarget("single", (), username=username, password=secret, db=int(query.get("db", "0")),
                           unix_path=u.path)  # fmt: skip
    path = [p for p in u.path.split("/") if p]
    if kind == "sentinel":
        if not path:
            raise ValueError("Redis URL: redis+sentinel:// needs the master's service name as its path")
        db = int(path[1]) if len(path) > 1 else int(query.get("db", "0"))
        return RedisTarget("sentinel", _hosts(hosts, 26379), tls, username, secret, db, service=unquote(path[0]),
                           sentinel_password=query.get("sentinel_password"))  # fmt: skip
    if kind == "cluster":
        if path and path != ["0"]:
            raise ValueError("Redis URL: a Redis Cluster has only database 0")
        return RedisTarget("cluster", _hosts(hosts, 6379), tls, username, secret)
    nodes = _hosts(hosts, 6379)
    if len(nodes) > 1:
        raise ValueError("Redis URL: several hosts need redis+cluster:// or redis+sentinel://")
    return RedisTarget("single", nodes, tls, username, secret, int(path[0]) if path else 0)
