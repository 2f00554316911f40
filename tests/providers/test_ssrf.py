"""Nothing in a request can change where the gateway connects or which credentials it sends.

`path()` and `headers()` take no request data but the endpoint (and a configured model name, which they
ignore); the translated bodies never carry a field that names a host, a header or a key.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.providers import provider_for
from gateway.providers.base import STEERING_FIELDS

OPTS = {"deployment": "gpt4o-prod", "api_version": "2024-10-21"}
KINDS = ["local", "openai", "azure", "anthropic"]
TRICKS: dict[str, Any] = {
    "api_base": "http://169.254.169.254/latest",
    "base_url": "http://evil.example/v1",
    "api_key": "sk-attacker",
    "api_version": "1999-01-01",
    "api_type": "azure",
    "azure_endpoint": "http://evil.example",
    "azure_deployment": "../../evil",
    "deployment_id": "evil",
    "engine": "evil",
    "organization": "org-evil",
    "extra_headers": {"Host": "evil.example", "Authorization": "Bearer sk-attacker", "x-api-key": "sk-attacker"},
    "extra_query": {"api-version": "evil"},
    "host": "evil.example",
    "url": "http://evil.example/#",
    "custom_llm_provider": "openai",
}
MODELS = ["gpt-4", "evil.example/v1#", "../../../admin?x=1", "@evil.example:80", "m\r\nHost: evil.example", "#frag"]


@pytest.mark.parametrize("kind", KINDS)
def test_path_and_headers_are_the_same_whatever_the_model_name(kind) -> None:
    p = provider_for(kind, OPTS)
    paths = {p.path("chat", m) for m in MODELS}
    headers = {tuple(sorted(p.headers("configured-key", "rid").items())) for _ in MODELS}
    assert len(paths) == 1 and len(headers) == 1
    path = paths.pop()
    assert path.startswith("/") and "evil" not in path and "#" not in path and "@" not in path


@pytest.mark.parametrize("kind", KINDS)
def test_credentials_and_routing_come_only_from_configuration(kind) -> None:
    p = provider_for(kind, OPTS)
    h = p.headers("configured-key", "rid")
    assert "configured-key" in " ".join(h.values())
    assert not any(k.lower() == "host" for k in h)
    assert all("\r" not in v and "\n" not in v for v in h.values())


@pytest.mark.parametrize("kind", KINDS)
def test_steering_fields_never_reach_an_upstream_body(kind) -> None:
    p = provider_for(kind, OPTS)
    body = {"model": "evil.example#", "messages": [{"role": "user", "content": "hi"}], **TRICKS}
    out = orjson.loads(p.request_body(body, "configured-model", False))
    assert not set(out) & set(STEERING_FIELDS) and not set(out) & set(TRICKS)
    assert out["model"] == "configured-model"
    assert b"evil" not in p.request_body(body, "configured-model", True)
    assert b"sk-attacker" not in p.request_body(body, "configured-model", True)


def test_azure_url_is_the_configured_deployment_and_api_version() -> None:
    p = provider_for("azure", OPTS)
    assert p.path("chat", "evil") == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"deployment": ""},
        {"deployment": "../evil"},
        {"deployment": "a/b"},
        {"deployment": "a?x=1"},
        {"deployment": "a#b"},
        {"deployment": "ok", "api_version": "2024-10-21&x=1"},
        {"deployment": "ok", "api_version": "latest"},
    ],
)
def test_azure_config_that_could_bend_the_url_is_refused_at_load(opts) -> None:
    with pytest.raises(ValueError):
        provider_for("azure", opts)


@pytest.mark.parametrize("version", ["2023-06-01\r\nx-api-key: evil", "latest", ""])
def test_anthropic_version_must_be_a_date(version) -> None:
    if version == "":
        assert provider_for("anthropic", {"api_version": version}).api_version == "2023-06-01"  # type: ignore[attr-defined]
        return
    with pytest.raises(ValueError):
        provider_for("anthropic", {"api_version": version})
