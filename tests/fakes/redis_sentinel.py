"""A real Sentinel set-up on loopback: a master, a replica and three Sentinels (quorum 2) watching them.
The master can be killed (-9); the Sentinels promote the replica, and the old master, restarted, is made
its replica."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.fakes.gateway import free_port
from tests.fakes.redis_server import RedisServer, redis_server_binary

__all__ = ["SERVICE", "SentinelSet"]

SERVICE = "qlp"


class ReplicatedServer(RedisServer):
    """A master or a replica; a replica's first full sync starts at once (Redis waits 5 s by default)."""

    def __init__(self, directory: Path, master_port: int | None = None) -> None:
        super().__init__(directory)
        self.master_port = master_port

    def extra_args(self) -> list[str]:
        of = ["--replicaof", "127.0.0.1", str(self.master_port)] if self.master_port else []
        return ["--repl-diskless-sync-delay", "0", *of]


class SentinelSet:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.servers: list[RedisServer] = [ReplicatedServer(directory / "a")]
        self.servers.append(ReplicatedServer(directory / "b", self.servers[0].port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{SERVICE}"

    def start(self) -> SentinelSet:
        for s in self.servers:
            s.start()
        binary = redis_server_binary()
        assert binary is not None
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.servers[0].port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        self.wait_ok()
        return self

    def master(self) -> RedisServer:
        port = self._master_port()
        return next(s for s in self.servers if s.port == port)

    def _master_port(self) -> int:
        r = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        try:
            return int(r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])
        finally:
            r.close()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every Sentinel names a live master that has a replica in sync."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ports = set()
                for p in self.sentinel_ports:
                    r = redis.Redis(port=p, socket_timeout=1)
                    ports.add(int(r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1]))
                    r.close()
                (port,) = ports
                master = next(s for s in self.servers if s.port == port)
                if master.alive():
                    m = redis.Redis(port=port, socket_timeout=1)
                    info = m.info("replication")
                    m.close()
                    synced = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
                    if info["role"] == "master" and any(r.get("state") == "online" for r in synced):
                        return
            except (redis.RedisError, ValueError, StopIteration):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel set-up did not settle")
            time.sleep(0.1)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self._master_port())

    def stop(self) -> None:
        for p in self.sentinels:
            p.terminate()
            p.wait(10)
        for s in self.servers:
            s.stop()
