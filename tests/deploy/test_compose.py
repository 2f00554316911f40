"""docker-compose.alora.yml: valid for every profile, vLLM per tier (GPU image or the CPU image built from
the tested pin) launched from the same files with runtime LoRA loading, and the gateway reads its own
fleet config."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import Kind, load_config
from gateway.settings import Settings

from .conftest import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    TIERS,
    VLLM_VERSION,
    compose_raw,
    compose_services,
    run,
    tool,
)

PROFILES = (None, "gpu", "cpu", "train")


def _compose_config(profile: str | None, *extra: str) -> str:
    exe = tool("docker-compose", "apt-get install docker-compose (make sysdeps does)")
    profile_args = ["--profile", profile] if profile else []
    # .env.example as the env file: the documented settings must produce a valid file too.
    proc = run([exe, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *profile_args, "config", *extra])
    assert proc.returncode == 0, f"docker-compose config (profile {profile}) failed:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p or "no-profile")
def test_compose_file_is_valid_for_every_profile(profile: str | None) -> None:
    _compose_config(profile, "-q")


def test_compose_config_resolves_with_the_env_example_settings() -> None:
    resolved = yaml.safe_load(_compose_config("cpu"))
    gateway = resolved["services"]["gateway"]
    assert gateway["environment"]["QLP_CONFIG"] == "/app/config/tiers.compose.yaml"
    assert "${" not in yaml.safe_dump(resolved), "an interpolation was left unresolved"


def _aliases(svc: dict[str, Any]) -> set[str]:
    networks = svc.get("networks") or {}
    if isinstance(networks, list):
        return set()
    return {a for net in networks.values() for a in (net or {}).get("aliases", [])}


def _names(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """host name on the compose network -> the service answering under it."""
    names = {name: name for name in services}
    for name, svc in services.items():
        for alias in _aliases(svc):
            assert alias not in names, f"{alias} answers for both {names[alias]} and {name}"
            names[alias] = name
    return names


def _listen_port(svc: dict[str, Any]) -> int:
    command = svc.get("command") or []
    for i, arg in enumerate(command):
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
        if arg == "--port":
            return int(command[i + 1])
    if "--config" in command:  # vLLM: the port is in its launch-arguments file
        cfg = yaml.safe_load(
            (ROOT / "services/vllm" / command[command.index("--config") + 1].rsplit("/", 1)[1]).read_text()
        )
        return int(cfg["port"])
    raise AssertionError(f"no --port in {command}")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_every_local_backend_of_the_gateway_config_answers_in_the_profile(profile: str) -> None:
    config = load_config(ROOT / "config/tiers.compose.yaml")
    services = compose_services(profile)
    names = _names(services)
    for tier in config.tiers.values():
        if tier.kind is not Kind.LOCAL:
            continue
        for backend in tier.backends:
            url = urlsplit(backend.base_url)
            assert url.hostname in names, f"{tier.name}: nothing answers as {url.hostname} in profile {profile}"
            svc = services[names[url.hostname]]
            assert _listen_port(svc) == url.port, f"{names[url.hostname]} does not listen on {url.port}"
            assert backend.health_path == "/health"


def test_gateway_reads_the_compose_fleet_config_from_the_mounted_config_folder() -> None:
    gateway = compose_raw()["services"]["gateway"]
    env = gateway["environment"]
    assert "./config:/app/config:ro" in gateway["volumes"]
    for key in ("QLP_CONFIG", "QLP_PRICING"):
        path = env[key]
        assert path.startswith("/app/config/") and (ROOT / "config" / path.removeprefix("/app/config/")).is_file(), key
    assert env["QLP_REDIS_URL"] == "redis://redis:6379/0"
    # several worker processes
    command = gateway["command"]
    assert int(command[command.index("--workers") + 1]) >= 2


def test_gateway_settings_named_in_compose_exist() -> None:
    # A misspelt QLP_ variable is silently ignored by the gateway: catch it here.
    fields = {f"QLP_{name.upper()}" for name in Settings.model_fields}
    for name in ("gateway", "trainer"):
        env = compose_raw()["services"][name]["environment"]
        unknown = sorted(k for k in env if k.startswith("QLP_") and k not in fields)
        assert not unknown, f"{name}: {unknown} are not gateway settings (gateway/settings.py)"


def test_gateway_waits_for_a_healthy_redis_with_persistence() -> None:
    services = compose_raw()["services"]
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    conf = (ROOT / "services/redis/redis.conf").read_text().splitlines()
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf and "dir /data" in conf


@pytest.mark.parametrize("tier", TIERS)
def test_gpu_profile_runs_one_vllm_per_tier_with_runtime_lora_loading(tier: str) -> None:
    svc = compose_raw()["services"][f"vllm-{tier}"]
    assert svc["profiles"] == ["gpu"]
    assert svc["image"] == f"vllm/vllm-openai:v{VLLM_VERSION}"  # the release tested here (vllm-cpu pin)
    assert svc["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert svc["command"][:2] == ["--config", f"/etc/qlp/vllm/{tier}.yaml"]
    assert "./services/vllm:/etc/qlp/vllm:ro" in svc["volumes"]
    assert "adapters:/app/models/adapters:ro" in svc["volumes"]
    assert any(v.endswith(":/models:ro") for v in svc["volumes"])
    assert svc["shm_size"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    health = svc["healthcheck"]
    assert "/health" in " ".join(health["test"])
    assert int(health["start_period"].rstrip("s")) >= 600, "model loading needs a long start period"


def test_each_tier_gets_its_own_gpu_by_default() -> None:
    services = compose_raw()["services"]
    ids = [services[f"vllm-{t}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0] for t in TIERS]
    assert len(set(ids)) == len(TIERS), "count: 1 would hand GPU 0 to every tier; device_ids must differ"


def test_cpu_profile_needs_no_gpu_and_no_gpu_image() -> None:
    for name, svc in compose_services("cpu").items():
        assert "deploy" not in svc, f"{name} reserves devices in the cpu profile"
        assert not str(svc.get("image", "")).startswith("vllm/"), f"{name} runs the GPU vLLM image in the cpu profile"


@pytest.mark.parametrize("tier", TIERS)
def test_cpu_profile_runs_the_tested_vllm_with_the_gpu_launch_files(tier: str) -> None:
    svc = compose_raw()["services"][f"vllm-cpu-{tier}"]
    assert svc["profiles"] == ["cpu"]
    assert svc["image"].endswith(f"/vllm-cpu:{VLLM_VERSION}")  # built from the vllm-cpu pin
    assert svc["build"]["dockerfile"] == "services/vllm/Dockerfile.cpu"
    assert svc["command"] == ["--config", f"/etc/qlp/vllm/{tier}.yaml"]
    assert "./services/vllm:/etc/qlp/vllm:ro" in svc["volumes"]
    assert "adapters:/app/models/adapters:ro" in svc["volumes"]
    assert f"vllm-{tier}" in _aliases(svc)


def test_cpu_image_bakes_the_model_where_the_launch_files_look_and_tags_the_pin() -> None:
    dockerfile = (ROOT / "services/vllm/Dockerfile.cpu").read_text()
    assert f"-t qlp-alora/vllm-cpu:{VLLM_VERSION} " in dockerfile
    assert "COPY --from=model /models/base /models/base" in dockerfile
    assert yaml.safe_load((ROOT / "services/vllm/t0.yaml").read_text())["model"] == "/models/base"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]' in dockerfile


def test_cpu_image_carries_the_lora_plugin_written_for_the_pinned_vllm() -> None:
    dockerfile = (ROOT / "services/vllm/Dockerfile.cpu").read_text()
    assert "COPY services/vllm/plugin /tmp/qlp-vllm-cpu" in dockerfile
    assert "pip install --no-deps --no-build-isolation /tmp/qlp-vllm-cpu" in dockerfile
    plugin = (ROOT / "services/vllm/plugin/qlp_vllm_cpu/__init__.py").read_text()
    assert f'VLLM_VERSION = "{VLLM_VERSION}"' in plugin  # it patches that release's internals, and only that one


def test_trainer_is_a_batch_service_of_its_own_profile() -> None:
    trainer = compose_raw()["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["restart"] == "no"
    assert "adapters:/app/models/adapters" in trainer["volumes"]


def test_every_shared_volume_has_one_owner_before_its_users_start() -> None:
    services = compose_raw()["services"]
    init_volumes = {v.split(":")[0] for v in services["volume-init"]["volumes"]}
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source in init_volumes and name != "volume-init":
                assert svc["depends_on"]["volume-init"]["condition"] == "service_completed_successfully", name


def test_published_ports_bind_loopback_by_default() -> None:
    for name, svc in compose_raw()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback by default"


def test_prometheus_and_grafana_find_their_provisioned_files() -> None:
    services = compose_raw()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config_dir, config_name = config_file.rsplit("/", 1)
    host_dir = ROOT / mounts[config_dir]
    scrape = yaml.safe_load((host_dir / config_name).read_text())
    for rule_file in scrape.get("rule_files", []):  # relative to the config file, as Prometheus reads them
        assert (host_dir / rule_file).is_file(), rule_file
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = ROOT / grafana_mounts["/etc/grafana/provisioning"]
    for provider_file in (provisioning / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            source = grafana_mounts[provider["options"]["path"]]
            assert list((ROOT / source).glob("*.json")), f"{provider['options']['path']} holds no dashboard"
    for datasource_file in (provisioning / "datasources").glob("*.y*ml"):
        for ds in yaml.safe_load(datasource_file.read_text())["datasources"]:
            assert urlsplit(ds["url"]).hostname in services, ds["url"]
