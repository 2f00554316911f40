"""Schemathesis against the gateway's own OpenAPI description, every check, positive and negative data.

A real gateway on loopback (metering on, real Redis, FakeUpstream behind it): no request it can generate
gets a 5xx, and every answer matches the description (status codes, content types, the error envelope).
Bounded for `make test` (25 examples per operation and phase, fixed seed); the long profile is
`QLP_FUZZ_EXAMPLES=1000 QLP_FUZZ_SEED=<n> QLP_FUZZ_REPORT=fuzz.json pytest tests/reliability/test_fuzz_openapi.py`
(docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

schemathesis = pytest.importorskip("schemathesis")

import hypothesis  # noqa: E402 (schemathesis's dependencies)
import jsonschema_rs  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.metering.reader import MAX_DAYS  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from tests.fakes.gateway import RunningGateway, start_gateway  # noqa: E402
from tests.fakes.redis_server import RedisServer  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402
from tests.metered import ADMIN_KEY, PRICING, create_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = int(os.environ.get("QLP_FUZZ_EXAMPLES", "25"))
SEED = int(os.environ.get("QLP_FUZZ_SEED", "20250611"))
TRIED: dict[str, int] = {}  # inputs sent, by operation (the figures in docs/reliability.md)


@pytest.fixture(scope="module")
def target(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, str]]:
    d: Path = tmp_path_factory.mktemp("fuzz")
    (d / "secrets").mkdir()
    (d / "secrets" / "admin_key").write_text(ADMIN_KEY)
    pricing = d / "pricing.yaml"
    pricing.write_text(yaml.safe_dump({**PRICING, "local": {f"T{i}": {"input": 1, "output": 2} for i in range(4)}}))
    with redis_server.client() as c:
        c.flushall()
    up = FakeUpstream("fuzz").start()
    cfg: dict[str, Any] = {
        "default_tier": "T0",
        "health_interval": 60,
        "retry": {"max_attempts": 1},
        # The fleet's four tiers (the description names T0..T3), all served by the loopback upstream.
        "tiers": {
            "T0": {
                "model": "m0",
                "aliases": ["qlp-t0"],
                "adapters": ["dev-v1"],
                "agents": {"developer": "dev-v1"},
                "backends": [{"name": "a", "base_url": up.base_url}],
            },
            **{
                f"T{i}": {
                    "model": f"m{i}",
                    "aliases": [f"qlp-t{i}"],
                    "backends": [{"name": "b", "base_url": up.base_url}],
                }
                for i in (1, 2, 3)
            },
        },
    }
    gw = start_gateway(cfg, d, metering=True, redis_url=redis_server.url, pricing=pricing, max_body_bytes=65536)
    key, _ = create_key(redis_server.url, "fuzz-tenant")
    try:
        yield gw, key
    finally:
        gw.stop()
        up.stop()
        if os.environ.get("QLP_FUZZ_REPORT"):  # the long profile's figures (docs/reliability.md)
            Path(os.environ["QLP_FUZZ_REPORT"]).write_text(json.dumps({"inputs": sum(TRIED.values()), **TRIED}))


def _description() -> dict[str, Any]:
    # The description is static (it does not depend on the fleet config), so it is loaded at collection
    # time; test_served_description_is_the_one_fuzzed checks the running gateway serves this very one.
    # (schemathesis.pytest.from_fixture would load it from the running gateway, but its lazy loader
    # does not work with pytest 9.)
    return create_app(Settings(metering=False, config=ROOT / "config" / "tiers.yaml")).api.openapi()


DESCRIPTION = _description()
schema = schemathesis.openapi.from_dict(DESCRIPTION)
# Unknown headers and query parameters are not generated as "invalid" input: HTTP requires a server to ignore
# header fields it does not know, and OpenAI-compatible clients add query parameters of their own.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES, allow_extra_parameters=False
)
schema.config.seed = SEED


def test_served_description_is_the_one_fuzzed(target: tuple[RunningGateway, str]) -> None:
    assert httpx.get(target[0].url + "/openapi.json", timeout=10).json() == DESCRIPTION


@schema.parametrize()
@hypothesis.settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_no_input_gets_a_server_error_or_an_undocumented_answer(case: Any, target: tuple[RunningGateway, str]) -> None:
    _, key = target
    # The proxy routes with a tenant's key (admission, limits and the ledger in the path); the ledger and
    # admin routes with the admin key, which may call all of them.
    token = key if case.operation.path in ("/v1/chat/completions", "/v1/completions") else ADMIN_KEY
    TRIED[case.operation.label] = TRIED.get(case.operation.label, 0) + 1
    headers = {"Authorization": f"Bearer {token}"}
    response = case.call(base_url=target[0].url, headers=headers, timeout=30)
    excluded = []
    if case.operation.label == "GET /v1/ledger/summary" and _range_rule_refused(response):
        # The one rule a JSON Schema cannot state: `since` <= `until`, at most 366 days apart. Refusing
        # such a pair is right even though each date alone is valid; every other check still applies.
        excluded.append(positive_data_acceptance)
    if _rollout_rule_refused(response):
        # A rollout's rules beyond its schema: tiers that exist in this fleet's config, arm names unique,
        # weights that add up to more than 0, a shadow onto another tier (gateway/rollout/model.py).
        excluded.append(positive_data_acceptance)
    if _valid_on_the_wire(case, response):
        # A "negative" query value that is a valid one once written into the URL (false -> "false", a fine
        # tenant name): the server cannot tell, and need not refuse it.
        excluded.append(negative_data_rejection)
    case.validate_response(response, headers=headers, excluded_checks=excluded)


def _valid_on_the_wire(case: Any, response: Any) -> bool:
    """Every query value, as it was written into the URL, is valid for its parameter: a "negative"
    `tenant=["false"]` or `tenant=False` is the valid `tenant=false` on the wire."""
    op = DESCRIPTION["paths"][case.operation.path][case.operation.method.lower()]
    declared = {p["name"]: p["schema"] for p in op.get("parameters", []) if p["in"] == "query"}
    sent = parse_qs(urlsplit(response.request.url).query, keep_blank_values=True)
    if not sent or not case.query:
        return False
    for name, values in sent.items():
        if name not in declared or len(values) != 1:
            return False  # an unknown parameter, or one given twice (refused: see metering/routes.py)
        if not jsonschema_rs.validator_for(declared[name], validate_formats=True).is_valid(values[0]):
            return False
    return True


def _rollout_rule_refused(response: Any) -> bool:
    return response.status_code == 400 and response.json()["error"]["code"] == "invalid_rollout"


def _range_rule_refused(response: Any) -> bool:
    if response.status_code != 400:
        return False
    message = response.json()["error"]["message"]
    return message in ("'until' is before 'since'", f"a summary covers at most {MAX_DAYS} days")
