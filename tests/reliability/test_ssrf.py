"""No request field or header can change the upstream host or the credentials the gateway sends.

Through a whole gateway: every steering field and header we know of names a second loopback server (the
"attacker's"); it must never be contacted, the configured upstream must get exactly the configured key,
and the caller's own key must never travel upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.providers.base import STEERING_FIELDS
from tests.fakes.gateway import RunningGateway
from tests.fakes.upstream import FakeUpstream
from tests.reliability.conftest import CANARY_T3, MSG, Tenants, auth, fleet


@pytest.fixture
def attacker() -> Iterator[FakeUpstream]:
    up = FakeUpstream("attacker").start()
    yield up
    up.stop()


def tricks(evil: str) -> dict[str, Any]:
    host = evil.split("//", 1)[1].split("/", 1)[0]
    return {
        "api_base": evil,
        "base_url": evil,
        "api_key": "sk-attacker-0000",
        "api_version": "evil",
        "api_type": "azure",
        "azure_endpoint": evil,
        "azure_deployment": "../../evil",
        "deployment_id": "evil",
        "engine": "evil",
        "organization": "org-evil",
        "custom_llm_provider": "openai",
        "host": host,
        "url": evil + "/chat/completions#",
        "extra_query": {"api-version": "evil"},
        "extra_headers": {"Host": host, "Authorization": "Bearer sk-attacker-0000", "x-api-key": "sk-attacker-0000"},
        "litellm_params": {"api_base": evil, "api_key": "sk-attacker-0000"},
        "proxy": evil,
        "metadata": {"api_base": evil},
        "user": evil,
    }


def steering_headers(evil: str) -> dict[str, str]:
    host = evil.split("//", 1)[1].split("/", 1)[0]
    return {
        "X-Forwarded-Host": host,
        "X-Forwarded-Proto": "http",
        "Forwarded": f"host={host};proto=http",
        "X-Original-URL": evil,
        "X-Rewrite-URL": evil,
        "X-Api-Key": "sk-attacker-0000",
        "Api-Key": "sk-attacker-0000",
        "OpenAI-Organization": "org-evil",
        "X-QLP-Backend": evil,
        "X-QLP-Upstream": evil,
        "Proxy-Authorization": "Bearer sk-attacker-0000",
        "X-Http-Method-Override": "GET",
        "X-Upstream-Url": evil,
    }


MODELS = ["qlp-t3", "{evil}/v1", "@{host}", "../../../admin?x=1", "gpt-4#", "http://{host}/v1/chat/completions"]


@pytest.fixture
def gw(metered: Callable[..., RunningGateway], upstreams, secrets_dir) -> RunningGateway:
    (secrets_dir / "t3_api_key").write_text(CANARY_T3)
    return metered(fleet(upstreams, t3=True))


@pytest.mark.parametrize("tier", ["T0", "T3"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_no_field_or_header_steers_the_upstream_or_its_credentials(
    gw, upstreams, attacker, tenants: Tenants, tier, stream, endpoint
) -> None:
    evil = attacker.base_url
    host = evil.split("//", 1)[1].split("/", 1)[0]
    target = upstreams["c"] if tier == "T3" else upstreams["a"]
    for model in MODELS:
        body = {"model": model.format(evil=evil, host=host), "stream": stream, **tricks(evil)}
        body.update({"messages": MSG} if endpoint.endswith("chat/completions") else {"prompt": "p"})
        url = f"{gw.url}{endpoint}?api-version=evil&base_url={evil}&api_base={evil}"
        r = httpx.post(
            url, json=body, headers={**auth(tenants.a), **steering_headers(evil), "X-QLP-Tier": tier}, timeout=20
        )
        assert r.status_code == 200, r.text
    assert not attacker.requests, "a request reached the attacker's server"
    assert len(target.requests) == len(MODELS)
    for req in target.requests:
        sent = {k.lower(): v for k, v in req["headers"].items()}
        assert req["path"] == endpoint  # the configured base URL's path: nothing from the caller's URL
        assert sent["host"] == target.base_url.split("//", 1)[1].split("/", 1)[0]
        assert sent.get("authorization") == (f"Bearer {CANARY_T3}" if tier == "T3" else None)
        assert tenants.a not in str(req["headers"])  # the caller's key never travels upstream
        assert not {
            "x-api-key",
            "api-key",
            "openai-organization",
            "proxy-authorization",
            "x-forwarded-host",
            "forwarded",
        } & set(sent)
        # Steering fields are dropped; other unknown fields pass through as data (STYLE.md), to the
        # configured upstream only.
        assert not set(STEERING_FIELDS) & set(req["body"])
        assert req["body"]["model"] == ("gpt-4" if tier == "T3" else "m0")
