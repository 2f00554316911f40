"""Publish an exported adapter: write models/adapters/<name>/<version>/, hot-load it into running model
servers, and point the gateway's tier/agent route at it.

    qlp train publish --lora var/train/developer/lora --adalora var/train/developer/adalora \\
        --name developer --version v3 --servers http://127.0.0.1:8100 --gateway http://127.0.0.1:8080 \\
        --tier T0 --agent developer          # admin key from QLP_ADMIN_KEY

Folder (immutable once written; written all at once):
    adapter_config.json, adapter_model.safetensors   plain LoRA, what vLLM and the model server load
    adalora/                                         the original AdaLoRA checkpoint (PEFT format)
    card.json                                        base model, dataset, training, rank pattern, evaluation

Model servers (vLLM's API): POST /v1/unload_lora_adapter {lora_name} (a 404 means it was not loaded),
then POST /v1/load_lora_adapter {lora_name, lora_path}. The name is the adapter name, so the gateway's
routes keep working across versions; between the two calls the name is briefly unknown on that server
(vLLM has no atomic replace). The gateway route (POST /v1/admin/routes {tier, agent, adapter[, weight]}) is
optional; a gateway without that route (404) gets a warning, not a failure: the folder and the servers are
already updated. With a weight (percent) the adapter becomes a canary arm of the tier/agent rollout, the
other arms keep their proportions in the rest (`qlp loop`, trainer/loop.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PublishError
from .files import atomic_dir, write_json

__all__ = ["ServerResult", "admin_get", "admin_key", "load_into_server", "publish_folder", "route_gateway"]

log = logging.getLogger("qlp.trainer.publish")
TIMEOUT_S = 120.0  # loading an adapter on a busy server waits for its engine thread


def publish_folder(
    lora_dir: Path,
    adalora_dir: Path | None,
    card: dict[str, Any],
    root: Path,
    name: str,
    version: str,
    *,
    force: bool = False,
) -> Path:
    """Write root/name/version/ (atomically). An existing version is refused unless `force`."""
    lora_dir = Path(lora_dir)
    for needed in ("adapter_config.json", "adapter_model.safetensors"):
        if not (lora_dir / needed).is_file():
            raise PublishError(f"{lora_dir}: no {needed}; export the adapter first (`qlp train export`)")
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise PublishError(
            f"{lora_dir}: peft_type {config.get('peft_type')!r}; only a plain LoRA export "
            "is published (vLLM does not load AdaLoRA)"
        )
    dest = Path(root) / name / version
    if dest.exists() and not force:
        raise PublishError(f"{dest} already exists; versions are immutable (pick another --version, or --force)")
    with atomic_dir(dest, replace=force) as tmp:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(lora_dir / f, tmp / f)
        if adalora_dir is not None:
            shutil.copytree(adalora_dir, tmp / "adalora")
        write_json(tmp / "card.json", {"name": name, "version": version, **card})
    return dest


@dataclass
class ServerResult:
    url: str
    replaced: bool  # an adapter of that name was loaded before


def _post(
    url: str, body: dict[str, Any] | None, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise PublishError(f"{url}: cannot connect: {getattr(exc, 'reason', exc)}") from exc


def _message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300]


def _root(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def load_into_server(server: str, name: str, path: Path | str) -> ServerResult:
    """Unload `name` if loaded, then load `path` under it. `path` is as the server sees it."""
    base = _root(server)
    status, body = _post(f"{base}/v1/unload_lora_adapter", {"lora_name": name})
    if status not in (200, 404):
        raise PublishError(f"{base}: unloading {name!r} failed ({status}): {_message(body)}")
    replaced = status == 200
    status, body = _post(f"{base}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    if status != 200:
        raise PublishError(f"{base}: loading {name!r} from {path} failed ({status}): {_message(body)}")
    return ServerResult(base, replaced)


def admin_key(key_file: Path | None) -> str | None:
    """The gateway admin key: the file's content, else $QLP_ADMIN_KEY, else None."""
    if key_file is not None:
        try:
            return Path(key_file).read_text().strip() or None
        except OSError as exc:
            raise PublishError(f"{key_file}: cannot read the admin key: {exc.strerror or exc}") from exc
    return os.environ.get("QLP_ADMIN_KEY") or None


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def admin_get(gateway: str, key: str | None, path: str) -> Any:
    """GET `path` of the gateway with the admin key; the JSON body. PublishError when refused or failing."""
    url = f"{_root(gateway)}{path}"
    status, body = _post(url, None, _auth(key), method="GET")
    if status in (401, 403):
        raise PublishError(f"{url}: the admin key was refused ({status}); set QLP_ADMIN_KEY or --admin-key-file")
    if status != 200:
        raise PublishError(f"{url}: failed ({status}): {_message(body)}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise PublishError(f"{url}: the answer is not JSON: {body[:200]!r}") from exc


def route_gateway(
    gateway: str, admin_key: str | None, tier: str, agent: str, adapter: str, weight: float | None = None
) -> bool:
    """Point the gateway's tier/agent route at `adapter`: all of it, or with `weight` (percent, 0 < w <= 100)
    as a canary arm. False (with a warning) if the gateway has no admin routes (404); PublishError for any
    other failure."""
    url = f"{_root(gateway)}/v1/admin/routes"
    request: dict[str, Any] = {"tier": tier, "agent": agent, "adapter": adapter}
    if weight is not None:
        request["weight"] = weight
    status, body = _post(url, request, _auth(admin_key))
    if status == 404:
        log.warning(
            "%s answered 404: this gateway has no admin routes; route %s/%s -> %s by adding the "
            "adapter to the tier's `adapters` and `agents` in the fleet config",
            url,
            tier,
            agent,
            adapter,
        )
        return False
    if status in (401, 403):
        raise PublishError(f"{url}: the admin key was refused ({status}); set QLP_ADMIN_KEY")
    if not 200 <= status < 300:
        raise PublishError(f"{url}: route update failed ({status}): {_message(body)}")
    return True
