"""POST /v1/feedback: the orchestrator says whether a request, or a whole workflow, succeeded.

    {"request_id": "req-1", "outcome": "success", "score": 0.9, "note": "tests pass"}
    {"workflow_id": "wf-42", "outcome": "failure"}

Any valid API key may post; a user key writes within its own tenant, an admin key within `tenant` (default
its own). The id must name something in that tenant's ledger, else 404 (`request_not_found` /
`workflow_not_found`): another tenant's request is "not found" too, never "forbidden", so that an id's
existence is not revealed. The latest feedback wins. Each ledger record the feedback applies to (one
request, or every request of the workflow) counts once in `qlp_feedback_total{tier, backend, model, outcome}`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Request, Security
from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import NotFound
from gateway.feedback import store
from gateway.metering.layout import TENANT_NAME
from gateway.metering.routes import MeterDep, PrincipalDep, store_errors, tenants_for
from gateway.metrics import child
from gateway.routes.responses import bearer, errors

__all__ = ["FeedbackByRequest", "FeedbackByWorkflow", "router"]

router = APIRouter(tags=["feedback"], dependencies=[Security(bearer)])

Id = Annotated[str, Field(min_length=1, max_length=512)]
# A JSON number (strict: not "0.5", not true), 0 worst .. 1 best.
Score = Annotated[float | None, Field(ge=0, le=1, strict=True)]


class _Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outcome: store.Outcome
    score: Score = None
    note: Annotated[str | None, Field(max_length=2000)] = None
    tenant: Annotated[
        str | None,
        Field(pattern=TENANT_NAME.pattern, description="admin keys: the tenant of the id (default the key's own)"),
    ] = None


class FeedbackByRequest(_Feedback):
    request_id: Id


class FeedbackByWorkflow(_Feedback):
    workflow_id: Id


def _common(records: list[dict[str, Any]], field: str) -> str | None:
    """The records' value of `field` when they all share one (a workflow may span tiers: then null)."""
    values = {r.get(field) for r in records}
    return values.pop() if len(values) == 1 else None


@router.post(
    "/v1/feedback",
    summary="Record the outcome of a request or a workflow (latest wins)",
    responses=errors(400, 401, 403, 404, 503),
)
async def post_feedback(
    request: Request, p: PrincipalDep, meter: MeterDep, body: FeedbackByRequest | FeedbackByWorkflow
) -> dict[str, Any]:
    tenant = (await tenants_for(meter, p, body.tenant or p.tenant))[0]
    value = {"outcome": body.outcome, "score": body.score, "note": body.note, "ts": time.time_ns() // 1_000_000}
    with store_errors():
        if isinstance(body, FeedbackByRequest):
            rec = await store.find_request(meter.redis, tenant, body.request_id, meter.settings.request_index_days)
            if rec is None:
                raise NotFound(f"no request {body.request_id[:128]!r} in the ledger", code="request_not_found")
            records, named = [rec], {"request_id": body.request_id}
        else:
            records = await store.find_workflow(meter.redis, tenant, body.workflow_id)
            if not records:
                raise NotFound(f"no workflow {body.workflow_id[:128]!r} in the ledger", code="workflow_not_found")
            named = {"workflow_id": body.workflow_id}
        await store.save(
            meter.redis,
            tenant,
            request_id=named.get("request_id"),
            workflow_id=named.get("workflow_id"),
            value=value,
            applied_to=len(records),
            ttl_s=meter.settings.ledger_days * 86_400,
        )
    m = request.app.state.runtime.metrics
    for r in records:
        child(m, m.feedback, str(r.get("tier")), str(r.get("backend")), str(r.get("model")), body.outcome).inc()
    return {
        "object": "feedback",
        **named,
        "tenant": tenant,
        "outcome": body.outcome,
        "score": body.score,
        "applied_to": len(records),
        "tier": _common(records, "tier"),
        "backend": _common(records, "backend"),
        "model": _common(records, "model"),
    }
