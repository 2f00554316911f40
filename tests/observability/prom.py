"""A real Prometheus (Debian's package, or whatever `prometheus` is on PATH) running the project's
services/prometheus/prometheus.yml, rewritten only where a test must: targets point at loopback ports,
intervals are one second, rule files are absolute paths. Job names, target labels, relabeling and the
rule files themselves are kept as they are.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.gateway import free_port
from tests.observability.exprs import PROM_DIR
from tests.wait import eventually

__all__ = ["Prometheus", "loopback_config", "require_binary", "running"]


def require_binary(name: str, package: str = "prometheus") -> str:
    """The binary's path. Missing: fail under CI (the Makefile's sysdeps installs it there), else skip
    with a reason that says what is not being tested."""
    path = shutil.which(name)
    if path:
        return path
    msg = (
        f"`{name}` is not installed: the Prometheus config, alert rules and dashboard queries are NOT "
        f"tested. Install Debian's `{package}` package (`make sysdeps`)."
    )
    if os.environ.get("CI"):
        pytest.fail(msg + " CI must run these tests.", pytrace=False)
    pytest.skip(msg)


def loopback_config(targets: dict[str, str], interval: str = "1s") -> dict[str, Any]:
    """services/prometheus/prometheus.yml with every target of job J replaced by targets[J]."""
    cfg: dict[str, Any] = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    cfg["rule_files"] = [str((PROM_DIR / f).resolve()) for f in cfg["rule_files"]]
    unknown = {j["job_name"] for j in cfg["scrape_configs"]} - set(targets)
    assert not unknown, f"the test does not know where to point job(s) {sorted(unknown)}"
    for job in cfg["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        for group in job["static_configs"]:
            group["targets"] = [targets[job["job_name"]]]
    return cfg


class Prometheus:
    def __init__(self, binary: str, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        self._args = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self, timeout: float = 30.0) -> Prometheus:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return self.http.get("/-/ready").status_code == 200
            return False

        eventually(ready, timeout, "prometheus to be ready")
        return self

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def api(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"/api/v1/{path}", params=params)
        doc = r.json()
        assert r.status_code == 200 and doc.get("status") == "success", f"{path} {params}: {r.status_code} {doc}"
        return doc["data"]

    def query(self, expr: str) -> dict[str, Any]:
        """The raw API answer (status, data or error) of an instant query: a bad expression is reported,
        not raised, so that a test can list every failing expression at once."""
        r = self.http.get("/api/v1/query", params={"query": expr})
        doc: dict[str, Any] = r.json()
        return doc

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def label_values(self, selector: str, label: str) -> list[str]:
        series = self.api("series", **{"match[]": selector})
        return sorted({s[label] for s in series if label in s})


@contextlib.contextmanager
def running(binary: str, config: dict[str, Any], workdir: Path) -> Iterator[Prometheus]:
    prom = Prometheus(binary, config, workdir).start()
    try:
        yield prom
    finally:
        prom.stop()
