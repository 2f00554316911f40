"""GET /v1/report: the rollout report as JSON (default) or as an HTML page with charts.

    GET /v1/report?since=2025-06-01&until=2025-06-30[&tenant=acme][&tier=T0][&agent=developer][&format=html]

Who may read what is the ledger's rule (gateway/metering/routes.py, `tenants_for`): a user key reads its
own tenant, an admin key every tenant or one. Days are whole UTC days, default today; a range whose end is
before its start is empty (an empty report, not an error: the records are filtered by the range, and no
record falls in it).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Security
from starlette.responses import HTMLResponse, JSONResponse, Response

from gateway.errors import InvalidRequest
from gateway.metering.reader import parse_day
from gateway.metering.routes import (
    MeterDep,
    PrincipalDep,
    SinceQuery,
    TenantQuery,
    UntilQuery,
    single_valued_query,
    store_errors,
    tenants_for,
)
from gateway.report import reader, render
from gateway.routes.responses import bearer, errors

__all__ = ["router"]

# `?tenant=b&tenant=a` is refused as on the ledger routes (a proxy that checked the first must not be overruled).
router = APIRouter(tags=["report"], dependencies=[Security(bearer), Depends(single_valued_query)])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The report (JSON), or with format=html a self-contained page with charts",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/html": {"schema": {"type": "string"}}},
    },
    **errors(400, 401, 403, 404, 503),
}


def _day(value: str | None, name: str, today: dt.date) -> dt.date:
    try:
        return parse_day(value, today)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be a date (YYYY-MM-DD, UTC)", param=name, code="invalid_value") from exc


@router.get(
    "/v1/report",
    summary="Rollout report: quality, latency, cost and savings per tier, agent and arm",
    responses=_RESPONSES,
    response_class=Response,
)
async def get_report(
    request: Request,
    p: PrincipalDep,
    meter: MeterDep,
    since: SinceQuery = None,
    until: UntilQuery = None,
    tenant: TenantQuery = None,
    tier: Annotated[str | None, Query(description="only requests for this tier (requested)", max_length=64)] = None,
    agent: Annotated[
        str | None, Query(description='only this agent ("(none)": requests without one)', max_length=128)
    ] = None,
    format: Literal["json", "html"] = "json",
) -> Response:
    today = dt.datetime.now(dt.UTC).date()
    first, last = _day(since, "since", today), _day(until, "until", today)
    tenants = await tenants_for(meter, p, tenant)
    with store_errors():
        rep = await reader.load(
            meter.redis,
            reader.Selection(tenants, first, last, tier or None, agent or None),
            reader.external_tiers(request.app.state.runtime.config),
        )
    if format == "html":
        return HTMLResponse(render.html_page(rep))
    return JSONResponse(rep)
