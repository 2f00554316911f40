"""Every route x every caller (anonymous, tenant A, tenant B, admin, a revoked key): exactly the intended
answer. The routes come from the app itself, so a new route without a row here fails the suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.gateway import RunningGateway
from tests.metered import ADMIN_KEY
from tests.reliability.conftest import MSG, Tenants, auth, create_key
from tests.wait import eventually

CALLERS = ("anonymous", "tenant_a", "tenant_b", "admin", "revoked")
PUBLIC = (200, 200, 200, 200, 200)
WF = "wf-of-tenant-a"

# (method, path) -> expected status per caller, in CALLERS order. Public: probes, scrapes and the API's own
# description (no tenant data in any of them; tests/reliability/test_secrets.py checks they hold no secret).
MATRIX: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/openapi.json"): PUBLIC,
    ("HEAD", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("HEAD", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("HEAD", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("HEAD", "/redoc"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/v1/models"): PUBLIC,
    ("POST", "/v1/chat/completions"): (401, 200, 200, 200, 401),
    ("POST", "/v1/completions"): (401, 200, 200, 200, 401),
    ("GET", "/v1/ledger/summary"): (401, 200, 200, 200, 401),
    # Tenant B asking for tenant A's workflow: it does not exist for B (404), not "forbidden" (no oracle).
    ("GET", "/v1/ledger/workflows/{workflow_id}"): (401, 200, 404, 200, 401),
    ("POST", "/v1/admin/keys"): (401, 403, 403, 201, 401),
    ("GET", "/v1/admin/keys"): (401, 403, 403, 200, 401),
    ("DELETE", "/v1/admin/keys/{key_id}"): (401, 403, 403, 200, 401),
    ("GET", "/v1/admin/rollouts"): (401, 403, 403, 200, 401),
    ("PUT", "/v1/admin/rollouts/{tier}/{agent}"): (401, 403, 403, 200, 401),
    ("DELETE", "/v1/admin/rollouts/{tier}/{agent}"): (401, 403, 403, 200, 401),
    ("POST", "/v1/admin/routes"): (401, 403, 403, 200, 401),
    # Feedback is written within the caller's tenant: B (and the admin, who names no tenant here) cannot
    # find A's workflow, and is not told that it exists.
    ("POST", "/v1/feedback"): (401, 200, 404, 404, 401),
    ("GET", "/v1/report"): (401, 200, 200, 200, 401),
}


def app_routes(gw: RunningGateway) -> set[tuple[str, str]]:
    """(method, path) of every route the gateway serves: FastAPI's (walking included routers, which newer
    FastAPI keeps whole) and the hand-dispatched proxy routes (declared to FastAPI too, for the docs)."""
    found: set[tuple[str, str]] = set()
    stack: list[Any] = list(gw.app.api.router.routes)
    while stack:
        route = stack.pop()
        nested = getattr(route, "original_router", None)
        if nested is not None:
            assert not getattr(route.include_context, "prefix", ""), "matrix paths assume routers without prefix"
            stack.extend(nested.routes)
            continue
        found |= {(m, route.path) for m in route.methods}
    return found


@pytest.fixture
def setup(
    metered: Callable[..., RunningGateway], tenants: Tenants, redis_url: str
) -> Iterator[tuple[RunningGateway, dict[str, str | None]]]:
    gw = metered()
    revoked, revoked_info = create_key(redis_url, "tenant-a")
    assert httpx.delete(f"{gw.url}/v1/admin/keys/{revoked_info.id}", headers=auth(tenants.admin)).status_code == 200
    # Tenant A has a workflow in the ledger.
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "qlp-t0", "messages": MSG},
        headers={**auth(tenants.a), "X-QLP-Workflow-Id": WF},
    )
    assert r.status_code == 200
    eventually(
        lambda: httpx.get(f"{gw.url}/v1/ledger/workflows/{WF}", headers=auth(tenants.a)).status_code == 200,
        what="tenant A's workflow in the ledger",
    )
    keys = {"anonymous": None, "tenant_a": tenants.a, "tenant_b": tenants.b, "admin": tenants.admin, "revoked": revoked}
    yield gw, keys


def call(gw: RunningGateway, method: str, path: str, key: str | None, redis_url: str) -> httpx.Response:
    headers = auth(key) if key else {}
    if path == "/v1/ledger/workflows/{workflow_id}":
        path = f"/v1/ledger/workflows/{WF}"
    if path == "/v1/admin/keys/{key_id}":
        _, victim = create_key(redis_url, "victims")  # each cell revokes a key of its own
        path = f"/v1/admin/keys/{victim.id}"
    json: dict[str, Any] | None = None
    if path == "/v1/admin/rollouts/{tier}/{agent}":
        path = "/v1/admin/rollouts/T0/matrix"
        json = {"arms": [{"name": "m", "weight": 1}]}
        if method == "DELETE":  # each cell deletes a rollout of its own
            assert httpx.put(gw.url + path, json=json, headers=auth(ADMIN_KEY), timeout=10).status_code == 200
    if path == "/v1/chat/completions":
        json = {"model": "qlp-t0", "messages": MSG}
    elif path == "/v1/completions":
        json = {"model": "qlp-t0", "prompt": "def f():"}
    elif method == "POST" and path == "/v1/admin/keys":
        json = {"tenant": "new-tenant", "name": "made by the matrix"}
    elif path == "/v1/admin/routes":
        json = {"tier": "T0", "agent": "matrix", "adapter": "dev-v9", "weight": 10}
    elif path == "/v1/feedback":
        json = {"workflow_id": WF, "outcome": "success"}
    return httpx.request(method, gw.url + path, json=json, headers=headers, timeout=20)


def test_every_route_has_a_row_in_the_matrix(setup) -> None:
    gw, _ = setup
    routes = app_routes(gw)
    assert routes == set(MATRIX), (
        f"routes without a row (add one, with the intended answer per caller): {sorted(routes - set(MATRIX))}; "
        f"rows without a route: {sorted(set(MATRIX) - routes)}"
    )


def test_every_route_answers_every_caller_as_intended(setup, redis_url) -> None:
    gw, keys = setup
    wrong = []
    for (method, path), expected in sorted(MATRIX.items()):
        for caller, want in zip(CALLERS, expected, strict=True):
            r = call(gw, method, path, keys[caller], redis_url)
            if r.status_code != want:
                wrong.append(f"{method} {path} as {caller}: {r.status_code}, want {want}")
            if r.status_code >= 400 and method != "HEAD":
                assert set(r.json()) == {"error"}, (method, path, caller, r.text)  # always the envelope
    assert not wrong, "\n".join(wrong)


def test_a_tenant_never_sees_another_tenants_ledger(setup, tenants: Tenants) -> None:
    gw, _ = setup

    def get(key: str, path: str, **params: str) -> httpx.Response:
        return httpx.get(gw.url + path, headers=auth(key), params=params, timeout=10)

    # B's own summary holds none of A's requests, whatever it is grouped by.
    for group in ("tier", "model", "agent", "workflow", "day", "tenant", "key"):
        s = get(tenants.b, "/v1/ledger/summary", group_by=group).json()
        assert s["tenants"] == ["tenant-b"] and s["total"]["requests"] == 0 and WF not in str(s), group
    a = get(tenants.a, "/v1/ledger/summary", group_by="workflow").json()
    assert a["total"]["requests"] >= 1 and any(row["group"] == WF for row in a["data"])
    # Naming A explicitly is refused, in either direction; a repeated `tenant` cannot smuggle it in.
    assert get(tenants.b, "/v1/ledger/summary", tenant="tenant-a").status_code == 403
    assert get(tenants.a, "/v1/ledger/summary", tenant="tenant-b").status_code == 403
    assert get(tenants.b, f"/v1/ledger/workflows/{WF}", tenant="tenant-a").status_code == 403
    smuggled = httpx.get(f"{gw.url}/v1/ledger/summary?tenant=tenant-b&tenant=tenant-a", headers=auth(tenants.b))
    assert smuggled.status_code == 400 and WF not in smuggled.text
    # The admin sees A's data, by tenant or across tenants.
    assert get(tenants.admin, f"/v1/ledger/workflows/{WF}").json()["tenant"] == "tenant-a"
    assert get(tenants.admin, "/v1/ledger/summary", tenant="tenant-a").json()["total"]["requests"] >= 1
    # Key listings are the admin's only, and never carry a key.
    listed = get(tenants.admin, "/v1/admin/keys").text
    assert tenants.a not in listed and tenants.b not in listed
