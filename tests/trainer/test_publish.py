"""Publish: the adapter folder, hot-loading into a real model server, and a changed answer through a real
gateway routing the developer agent to the new adapter."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.fakes.gateway import RunningGateway
from tests.trainer.conftest import BASE_NAME, Exported, ModelServer, TrainedRun
from trainer.cli import main
from trainer.data import load_tokenizer
from trainer.errors import PublishError
from trainer.evaluate import generate, load_adapter_model
from trainer.publish import route_gateway

NAME = "dev-test"
PROMPTS = ["What is the capital of France?", "Write a Python function add_9(x) that returns x + 9."]
MAX_TOKENS = 16


def _publish(trained: TrainedRun, exported: Exported, root: Path, version: str, *extra: str) -> int:
    return main(
        [
            "publish",
            "--output-dir",
            str(trained.cfg.output_path),
            "--base-model",
            trained.cfg.base_model,
            "--name",
            NAME,
            "--version",
            version,
            "--adapters-root",
            str(root),
            "--lora",
            str(exported.path),
            "--adalora",
            str(trained.result.adapter_dir),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def adalora_answers(trained: TrainedRun) -> list[str]:
    """Greedy replies of base + AdaLoRA (PEFT, in this process): what the served LoRA must reproduce."""
    model = load_adapter_model(trained.cfg.base_model, trained.result.adapter_dir, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(trained.cfg.base_model)
    return generate(model, tok, [[{"role": "user", "content": p}] for p in PROMPTS], MAX_TOKENS, 1, torch.device("cpu"))


def test_publish_writes_the_folder_and_loads_it_into_the_model_server(
    trained: TrainedRun,
    exported: Exported,
    model_server: ModelServer,
    adapters_root: Path,
    adalora_answers: list[str],
    gateway_factory: Callable[..., RunningGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _publish(trained, exported, adapters_root, "v1", "--servers", model_server.url) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"server": model_server.url, "loaded": NAME, "replaced": False} in out

    dest = adapters_root / NAME / "v1"
    assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (dest / "adapter_model.safetensors").is_file()
    assert json.loads((dest / "adalora" / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    card = json.loads((dest / "card.json").read_text())
    assert card["name"] == NAME and card["version"] == "v1"
    assert card["rank_pattern"] == trained.result.rank_pattern
    assert card["dataset"]["hash"] == trained.dataset.hash
    assert card["training"]["steps"] == 6 and card["adalora"]["target_r"] == 2
    assert card["export"]["equivalence"]["max_abs_diff"] <= 1e-4
    assert len(card["base_model"]["weights_sha256"]) == 64

    config = {
        "default_tier": "T0",
        "tiers": {
            "T0": {
                "model": BASE_NAME,
                "adapters": [NAME],
                "agents": {"developer": NAME},
                "backends": [{"name": "t0-local", "base_url": f"{model_server.url}/v1"}],
            }
        },
    }
    gw = gateway_factory(config)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(prompt: str, agent: str | None) -> tuple[str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model=BASE_NAME,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_headers={"X-QLP-Agent": agent} if agent else None,
        )
        return raw.parse().choices[0].message.content or "", raw.headers

    answers = []
    for prompt, expected in zip(PROMPTS, adalora_answers, strict=True):
        base, _ = ask(prompt, None)
        tuned, headers = ask(prompt, "developer")
        assert NAME in headers.get("x-qlp-backend", "")
        # The served LoRA reproduces the AdaLoRA model's greedy answer token for token...
        assert tuned == expected, (prompt, tuned, expected)
        answers.append((base, tuned))
    # ...and that answer is not the base model's.
    assert any(base != tuned for base, tuned in answers), answers


def test_republishing_replaces_the_loaded_adapter_and_versions_are_immutable(
    trained: TrainedRun,
    exported: Exported,
    model_server: ModelServer,
    adapters_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not (adapters_root / NAME / "v1").exists():
        assert _publish(trained, exported, adapters_root, "v1", "--servers", model_server.url) == 0
    capsys.readouterr()
    assert _publish(trained, exported, adapters_root, "v2", "--servers", model_server.url) == 0
    assert {"server": model_server.url, "loaded": NAME, "replaced": True} in [
        json.loads(line) for line in capsys.readouterr().out.splitlines()
    ]
    assert _publish(trained, exported, adapters_root, "v1") == 2
    assert "already exists; versions are immutable" in capsys.readouterr().err


def test_server_that_refuses_the_adapter_fails_the_publish(
    trained: TrainedRun,
    exported: Exported,
    model_server: ModelServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # An adapter whose rank exceeds vLLM's --max-lora-rank (64): vLLM 0.32 refuses it (with a 500, as its worker
    # raises), publish fails naming the cause, and the server keeps serving.
    too_wide = tmp_path / "too-wide"
    shutil.copytree(exported.path, too_wide)
    cfg = json.loads((too_wide / "adapter_config.json").read_text())
    (too_wide / "adapter_config.json").write_text(json.dumps({**cfg, "r": 128, "rank_pattern": {}}))
    assert (
        main(
            [
                "publish",
                "--output-dir",
                str(trained.cfg.output_path),
                "--base-model",
                trained.cfg.base_model,
                "--name",
                NAME,
                "--version",
                "v9",
                "--adapters-root",
                str(tmp_path / "root"),
                "--lora",
                str(too_wide),
                "--servers",
                model_server.url,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "loading 'dev-test'" in err and "LoRA rank 128 is greater than max_lora_rank 64" in err, err
    assert httpx.get(f"{model_server.url}/health", timeout=10).status_code == 200


# ---- the gateway's admin route, on a loopback stand-in (the real route: tests/rollout, tests/trainer/test_loop.py) ----


class _Admin(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[tuple[str, str | None, dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        payload = b'{"error": {"message": "nope", "type": "x", "param": null, "code": null}}'
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def admin_stub() -> Iterator[tuple[str, type[_Admin]]]:
    handler = type("Handler", (_Admin,), {"seen": [], "status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    thread.join(5)


def test_gateway_route_update_sends_tier_agent_and_adapter_with_the_admin_key(admin_stub) -> None:
    url, handler = admin_stub
    assert route_gateway(url, "adm-key", "T0", "developer", NAME) is True
    assert handler.seen == [
        ("/v1/admin/routes", "Bearer adm-key", {"tier": "T0", "agent": "developer", "adapter": NAME})
    ]


def test_gateway_without_admin_routes_is_a_warning_not_a_failure(admin_stub, caplog) -> None:
    url, handler = admin_stub
    handler.status = 404
    assert route_gateway(url, None, "T0", "developer", NAME) is False
    assert "no admin routes" in caplog.text


def test_refused_admin_key_fails_the_publish(admin_stub) -> None:
    url, handler = admin_stub
    handler.status = 401
    with pytest.raises(PublishError, match="admin key was refused"):
        route_gateway(url, "wrong", "T0", "developer", NAME)


def test_publishing_with_a_weight_adds_a_canary_under_a_name_of_its_own(
    trained: TrainedRun, exported: Exported, tmp_path: Path, admin_stub
) -> None:
    url, handler = admin_stub
    key_file = tmp_path / "admin_key"
    key_file.write_text("adm-key\n")
    assert (
        _publish(
            trained,
            exported,
            tmp_path / "adapters",
            "v7",
            "--gateway",
            url,
            "--tier",
            "T0",
            "--admin-key-file",
            str(key_file),
            "--weight",
            "20",
        )
        == 0
    )
    assert (tmp_path / "adapters" / NAME / "v7" / "adapter_model.safetensors").is_file()
    assert handler.seen == [
        (
            "/v1/admin/routes",
            "Bearer adm-key",
            {"tier": "T0", "agent": "developer", "adapter": f"{NAME}-v7", "weight": 20.0},
        )
    ]
