"""The deployed fleet configs stay in step with the dev one and are fully priced; vLLM serves the names the
gateway sends; every image is pinned and runs as non-root; no secret value is written anywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Kind, load_config
from gateway.metering.pricing import load_pricing

from .conftest import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    OVERLAYS,
    ROOT,
    TIERS,
    compose_raw,
    containers,
    pod_spec,
    render,
)

DEPLOYED = {"compose": ROOT / "config/tiers.compose.yaml", "k8s": ROOT / "config/tiers.k8s.yaml"}
OUR_DOCKERFILES = (ROOT / "gateway/Dockerfile", ROOT / "services/vllm/Dockerfile.cpu")


def _without_backend_urls(path: Path) -> dict[str, Any]:
    data = load_config(path).model_dump()
    for tier in data["tiers"].values():
        for backend in tier["backends"]:
            backend.pop("base_url")
    return data


@pytest.mark.parametrize("where", DEPLOYED)
def test_deployed_fleet_config_differs_from_the_dev_config_only_in_backend_urls(where: str) -> None:
    assert _without_backend_urls(DEPLOYED[where]) == _without_backend_urls(ROOT / "config/tiers.yaml"), (
        f"config/tiers.yaml changed: carry the change into {DEPLOYED[where].relative_to(ROOT)}"
    )


@pytest.mark.parametrize("where", DEPLOYED)
def test_deployed_fleet_config_is_fully_priced(where: str) -> None:
    # The gateway refuses to start with metering on when a tier that can serve has no price.
    load_pricing(ROOT / "config/pricing.yaml").check(load_config(DEPLOYED[where]))


@pytest.mark.parametrize("tier", TIERS)
def test_each_vllm_tier_serves_the_model_name_the_gateway_sends(tier: str) -> None:
    args = yaml.safe_load((ROOT / f"services/vllm/{tier}.yaml").read_text())
    for path in DEPLOYED.values():
        t = load_config(path).tiers[tier.upper()]
        assert t.kind is Kind.LOCAL
        assert args["served-model-name"] == t.model, f"{path.name}: {tier} sends {t.model!r}"
        assert all(b.base_url == f"http://vllm-{tier}:{args['port']}/v1" for b in t.backends)
    assert args["enable-lora"] is True
    assert args["max-lora-rank"] >= 64 and args["max-cpu-loras"] >= args["max-loras"] >= 1
    assert args["model"].startswith("/models/")
    for module in args.get("lora-modules") or []:
        assert module.split("=", 1)[1].startswith("/app/models/adapters/"), module


# ---- images -------------------------------------------------------------------------------------------

PINNED = re.compile(r"^[\w./-]+(:[vV]?\d+\.\d+\.\d+[\w.-]*|@sha256:[0-9a-f]{64})$")


def _dockerfile_bases(path: Path) -> list[str]:
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    bases = []
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        bases.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref))
    return bases


def _images() -> dict[str, str]:
    images = {f"compose:{n}": s["image"] for n, s in compose_raw()["services"].items() if "image" in s}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if re.match(r"^QLP_\w+_IMAGE=", line):
            images[f".env.example:{line.split('=')[0]}"] = line.split("=", 1)[1]
    for overlay in ("base", *OVERLAYS):  # the base too: an overlay's `images:` could hide a loose tag there
        for doc in render(overlay):
            if "template" in doc.get("spec", {}):
                for c in containers(pod_spec(doc)):
                    images[f"k8s/{overlay}:{doc['metadata']['name']}/{c['name']}"] = c["image"]
    for path in OUR_DOCKERFILES:
        for base in _dockerfile_bases(path):
            images[f"{path.relative_to(ROOT)}:FROM"] = base
    return images


def test_every_image_is_pinned_to_a_version() -> None:
    loose = {where: image for where, image in _images().items() if not PINNED.match(image)}
    assert not loose, f"unpinned images (latest, no tag, or no x.y.z): {loose}"


@pytest.mark.parametrize("dockerfile", OUR_DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = re.findall(r"^USER (\S+)", dockerfile.read_text(), re.M)
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in {"0", "root"}


def _pip_install_targets(dockerfile: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())  # join continuation lines
    runs = [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ")]
    commands = [c.strip() for run in runs for c in run.split("&&")]
    return [t for c in commands if c.startswith("pip install") for t in c.split()[2:] if not t.startswith("-")]


def test_gateway_image_installs_the_gateway_without_torch() -> None:
    # `pip install .`, no extras: the gateway's dependencies only (DESIGN.md: the gateway never imports torch).
    assert _pip_install_targets(ROOT / "gateway/Dockerfile") == ["pip", "."]


def test_every_compose_build_has_its_dockerfile() -> None:
    for name, svc in compose_raw()["services"].items():
        if "build" in svc:
            dockerfile = ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile.relative_to(ROOT)} is missing"


# ---- secrets ------------------------------------------------------------------------------------------

# A key or variable that holds a secret value by its name.
# (`key: t3_api_key` in a secretKeyRef, or `api_key_secret: t3_api_key` in a fleet config, name a secret.)
SECRET_NAME = re.compile(
    r"(?i)([_-](key|password|passwd|token|credentials)|^(api[_-]?key|password|passwd|token|credentials))$"
)
# Values shaped like real credentials, wherever they appear.
SECRET_SHAPES = re.compile(
    r"sk-[A-Za-z0-9_-]{16,}|-----BEGIN [A-Z ]*PRIVATE KEY-----|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|://[^/\s:@]+:[^/\s@$]+@"
)
# A reference to a value kept elsewhere: empty, or ${VAR} without a default.
REFERENCE = re.compile(r"^(|\$\{[A-Za-z_][A-Za-z0-9_]*\})$")


def _deployment_files() -> list[Path]:
    files = [COMPOSE_FILE, ENV_EXAMPLE, *OUR_DOCKERFILES, *DEPLOYED.values()]
    for folder in ("k8s", "services/vllm", "services/redis"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file()]
    return files


def _named_values(node: Any, found: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """(name, literal value) pairs: mapping entries, and k8s-style {name: X, value: Y} env entries."""
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node:
            found.append((node["name"], node["value"]))
        for key, value in node.items():
            if not isinstance(value, dict | list):
                found.append((str(key), value))
            _named_values(value, found)
    elif isinstance(node, list):
        for item in node:
            _named_values(item, found)
    return found


def test_no_secret_value_is_written_in_compose_k8s_or_the_env_example() -> None:
    problems = []
    for path in _deployment_files():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        problems += [f"{rel}: credential-shaped {m.group(0)[:12]}..." for m in SECRET_SHAPES.finditer(text)]
        pairs: list[tuple[str, Any]] = []
        if path.suffix in {".yml", ".yaml"}:
            for doc in yaml.safe_load_all(text):
                _named_values(doc, pairs)
        elif path == ENV_EXAMPLE:
            pairs = [(name, value) for name, value in re.findall(r"^(\w+)=(.*)$", text, re.M)]
        for name, value in pairs:
            if SECRET_NAME.search(name) and not REFERENCE.match("" if value is None else str(value)):
                problems.append(f"{rel}: {name} has a literal value")
    for overlay in OVERLAYS:  # what kustomize generates, too
        for doc in render(overlay):
            for name, value in _named_values(doc, []):
                if SECRET_NAME.search(name) and not REFERENCE.match("" if value is None else str(value)):
                    problems.append(f"k8s/{overlay}: {doc['kind']}/{doc['metadata']['name']}: {name}")
    assert not problems, "\n".join(problems)


def test_the_secret_scan_catches_a_planted_key() -> None:
    planted = {"environment": {"QLP_T3_API_KEY": "not-a-reference"}, "env": [{"name": "QLP_ADMIN_KEY", "value": "x"}]}
    flagged = [n for n, v in _named_values(planted, []) if SECRET_NAME.search(n) and not REFERENCE.match(str(v))]
    assert sorted(flagged) == ["QLP_ADMIN_KEY", "QLP_T3_API_KEY"]
    assert SECRET_SHAPES.search("key: sk-" + "a1" * 12)
    assert SECRET_SHAPES.search("QLP_REDIS_URL=redis://user:hunter2@redis:6379/0")
