"""A real Redis Cluster on loopback: `redis-server` processes in cluster mode, 3 masters and a replica each,
joined with `redis-cli --cluster create`. A master can be killed (-9) and its replica takes over."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.fakes.gateway import free_port
from tests.fakes.redis_server import RedisServer

__all__ = ["RedisClusterServer", "cluster_binaries"]

NODE_TIMEOUT_MS = 1000  # how long a master may be silent before its replica is promoted


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port > 55000:
            port = 20000 + port % 30000
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def cluster_binaries() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


class ClusterNodeServer(RedisServer):
    def extra_args(self) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.dir / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--repl-diskless-sync-delay", "0",  # a replica's first sync at once, not after Redis's 5 s
        ]  # fmt: skip


class RedisClusterServer:
    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1) -> None:
        self.dir = directory
        n = masters * (1 + replicas)
        self.nodes = [ClusterNodeServer(directory / f"node{i}", _cluster_port()) for i in range(n)]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """`redis+cluster://` with every node as a seed: any one of them answering is enough to start."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServer:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_ok(replicated=True)
        return self

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes if n.alive()])

    def wait_ok(self, timeout: float = 30, replicated: bool = False) -> None:
        """Until every live node says the cluster is ok and every slot's master is a live node (and, when
        `replicated`, every master has its replicas in sync, so that a master killed next can fail over)."""
        alive = {n.port for n in self.nodes if n.alive()}
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok = True
                for port in alive:
                    r = redis.Redis(port=port)
                    info = r.cluster("info")
                    slots = r.execute_command("CLUSTER", "SLOTS")
                    masters = {int(entry[2][1]) for entry in slots}
                    ok = ok and info["cluster_state"] == "ok" and masters <= alive
                    if replicated:
                        ok = ok and all(len(entry) >= 3 + self.replicas for entry in slots)
                        role = r.execute_command("ROLE")
                        ok = ok and (role[0] == b"master" or role[3] == b"connected")
                    r.close()
                if ok:
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ok")
            time.sleep(0.1)

    def master_of(self, key: str) -> ClusterNodeServer:
        """The node that holds `key`'s slot now."""
        c = self.client()
        try:
            node = c.get_node_from_key(key)
        finally:
            c.close()
        return next(n for n in self.nodes if n.port == node.port)

    def flushall(self) -> None:
        for n in self.nodes:
            if n.alive() and redis.Redis(port=n.port).execute_command("ROLE")[0] == b"master":
                redis.Redis(port=n.port).flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
