"""Ledger and key routes (FastAPI): who may read what is decided here, the reading is in reader.py.

    GET    /v1/ledger/summary?group_by=tier|model|agent|workflow|day|tenant&since=&until=&tenant=
    GET    /v1/ledger/workflows/{id}
    POST   /v1/admin/keys            GET /v1/admin/keys            DELETE /v1/admin/keys/{id}

A tenant's key reads its own tenant's ledger; an admin key reads every tenant's (or one, `tenant=`) and
manages keys. Any other use is 403.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Security
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from gateway.errors import InvalidRequest, NotFound, PermissionDenied, ServiceUnavailable
from gateway.metering import reader
from gateway.metering.keys import KeyLimits, Principal, Role
from gateway.metering.layout import TENANT_NAME
from gateway.metering.meter import UNAVAILABLE, Meter
from gateway.metering.pricing import micros_of_usd
from gateway.routes.responses import bearer, errors

__all__ = ["router"]


async def single_valued_query(request: Request) -> None:
    """A parameter given twice is refused, not resolved to one of its values: a proxy in front that checks
    the first `tenant=` must not be overruled by a second one (HTTP parameter pollution)."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise InvalidRequest(
                f"query parameter {name[:64]!r} is given more than once", param=name[:64], code="invalid_value"
            )
        seen.add(name)


router = APIRouter(tags=["ledger"], dependencies=[Security(bearer), Depends(single_valued_query)])


def _meter(request: Request) -> Meter:
    meter: Meter | None = request.app.state.runtime.meter
    if meter is None:
        raise NotFound("metering is off on this gateway (QLP_METERING=false)", code="not_found")
    return meter


MeterDep = Annotated[Meter, Depends(_meter)]


async def _principal(request: Request, meter: MeterDep) -> Principal:
    return await meter.principal(request.headers.get("authorization"))


PrincipalDep = Annotated[Principal, Depends(_principal)]


async def _admin(p: PrincipalDep) -> Principal:
    if not p.is_admin:
        raise PermissionDenied("this route needs an admin key", code="admin_only")
    return p


AdminDep = Annotated[Principal, Depends(_admin)]


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Redis unreachable -> 503 `ledger_unavailable` (also for the feedback and report routes)."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise ServiceUnavailable("the ledger store is unreachable", code="ledger_unavailable") from exc


async def tenants_for(meter: Meter, p: Principal, tenant: str | None) -> list[str]:
    """The tenants a caller may read (user: its own; admin: one, or all); the feedback and report use it too."""
    if tenant is not None and not TENANT_NAME.match(tenant):
        raise InvalidRequest("invalid tenant name", param="tenant", code="invalid_value")
    if not p.is_admin:
        if tenant is not None and tenant != p.tenant:
            raise PermissionDenied("a key reads only its own tenant's ledger", code="forbidden_tenant")
        return [p.tenant]
    if tenant is not None:
        return [tenant]
    with store_errors():
        known = await meter.keys.tenants()
    return sorted({*known, "admin"})  # "admin": the bootstrap admin key's own requests


def _range(since: str | None, until: str | None) -> tuple[dt.date, dt.date]:
    today = dt.datetime.now(dt.UTC).date()
    try:
        return reader.parse_day(since, today), reader.parse_day(until, today)
    except ValueError as exc:
        raise InvalidRequest(
            "since/until must be dates (YYYY-MM-DD, UTC)", param="since", code="invalid_value"
        ) from exc


# A UTC day; empty is the same as absent (today).
_DAY: dict[str, Any] = {
    "anyOf": [{"type": "string", "format": "date"}, {"type": "string", "maxLength": 0}, {"type": "null"}]
}
# The query parameters of a day range and a tenant, shared by every route that reads the ledger.
SinceQuery = Annotated[
    str | None, Query(description="first UTC day, YYYY-MM-DD (default today)", json_schema_extra=_DAY)
]
UntilQuery = Annotated[str | None, Query(description="last UTC day, inclusive (default today)", json_schema_extra=_DAY)]
TenantQuery = Annotated[str | None, Query(description="admin: one tenant (default all)", pattern=TENANT_NAME.pattern)]


@router.get(
    "/v1/ledger/summary",
    summary="Cost, tokens and savings grouped by tier, model, agent, workflow or day",
    responses=errors(400, 401, 403, 404, 503),
)
async def ledger_summary(
    p: PrincipalDep,
    meter: MeterDep,
    group_by: reader.GroupBy = "tier",
    since: SinceQuery = None,
    until: UntilQuery = None,
    tenant: TenantQuery = None,
) -> dict[str, Any]:
    first, last = _range(since, until)
    tenants = await tenants_for(meter, p, tenant)
    try:
        with store_errors():
            return await reader.summary(meter.redis, tenants, group_by, first, last)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="until", code="invalid_value") from exc


@router.get(
    "/v1/ledger/workflows/{workflow_id}",
    summary="Cost of one workflow and every request in it",
    responses=errors(400, 401, 403, 404, 503),
)
async def ledger_workflow(
    p: PrincipalDep,
    meter: MeterDep,
    workflow_id: str,
    tenant: Annotated[str | None, Query(pattern=TENANT_NAME.pattern)] = None,
) -> dict[str, Any]:
    with store_errors():
        for t in await tenants_for(meter, p, tenant):
            found = await reader.workflow(meter.redis, t, workflow_id)
            if found is not None:
                return found
    raise NotFound(f"no workflow {workflow_id[:128]!r} in the ledger", code="workflow_not_found")


_USD_TEXT = r"^[0-9]{1,15}(\.[0-9]{1,6})?$"


def _usd_text(v: Any) -> Any:
    if isinstance(v, str) and not re.fullmatch(_USD_TEXT, v):
        raise ValueError('a text amount is decimal USD, like "12.50"')
    return v


# USD as a JSON number or a decimal string (exact). The description says so; the API accepts nothing else.
Usd = Annotated[
    Decimal,
    BeforeValidator(_usd_text),
    Field(ge=0),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _USD_TEXT}]}),
]


def _json_int(v: Any) -> Any:
    if isinstance(v, str | bool):
        raise ValueError("must be a JSON integer")  # lax int would take "5" and true
    return v


Count = Annotated[int, Field(ge=0), BeforeValidator(_json_int)]  # 5 and 5.0 (one JSON number), not "5"


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=TENANT_NAME.pattern)
    name: str = Field("", max_length=200)
    role: Role = "user"
    budget_day_usd: Usd = Field(Decimal(0), description="0: no daily budget")
    budget_month_usd: Usd = Field(Decimal(0), description="0: no monthly budget")
    requests_per_minute: Count = 0
    tokens_per_minute: Count = 0


@router.post(
    "/v1/admin/keys",
    summary="Create an API key (shown once)",
    status_code=201,
    responses=errors(400, 401, 403, 404, 503),
)
async def create_key(_: AdminDep, meter: MeterDep, body: KeyRequest) -> dict[str, Any]:
    limits = KeyLimits(
        micros_of_usd(body.budget_day_usd),
        micros_of_usd(body.budget_month_usd),
        body.requests_per_minute,
        body.tokens_per_minute,
    )
    with store_errors():
        key, info = await meter.keys.create(body.tenant, name=body.name, role=body.role, limits=limits)
    return {"key": key, **info.as_dict()}


@router.get(
    "/v1/admin/keys", summary="List API keys (never the keys themselves)", responses=errors(400, 401, 403, 404, 503)
)
async def list_keys(_: AdminDep, meter: MeterDep, tenant: str | None = None) -> dict[str, Any]:
    with store_errors():
        keys = await meter.keys.list_keys(tenant)
    return {"object": "list", "data": [k.as_dict() for k in keys]}


@router.delete("/v1/admin/keys/{key_id}", summary="Revoke an API key", responses=errors(400, 401, 403, 404, 503))
async def revoke_key(_: AdminDep, meter: MeterDep, key_id: str) -> dict[str, Any]:
    with store_errors():
        info = await meter.keys.revoke(key_id)
    if meter.leases is not None:  # this process stops at once; others within their lease (lease.py)
        meter.leases.close_key(key_id)
    if info is None:
        raise NotFound(f"no key {key_id[:32]!r}", code="key_not_found")
    return info.as_dict()
