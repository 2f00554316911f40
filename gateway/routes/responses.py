"""What the OpenAPI description says about errors and credentials, shared by every route declaration.

Every error is OpenAI's envelope (gateway/errors.py); `errors(...)` documents the statuses a route can
answer with it. `bearer` declares the API key scheme; it never refuses anything itself (auto_error off):
the meter checks keys (gateway/metering/meter.py), and the proxy routes are not FastAPI routes at all.
"""

from __future__ import annotations

from typing import Any

from fastapi.security import HTTPBearer
from pydantic import BaseModel

__all__ = ["ErrorEnvelope", "bearer", "errors"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail


_MEANING = {
    400: "Invalid request: bad JSON, field, header or query parameter",
    401: "Missing, unknown or revoked API key",
    403: "The key may not use this route or read this tenant",
    404: "Unknown model, workflow or key; or metering is off",
    413: "Request body too large",
    429: "Rate limit or budget reached (see Retry-After)",
    502: "The upstream failed",
    503: "No healthy upstream, upstream not configured, or the ledger store is unreachable",
    504: "The upstream timed out",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with its meaning and the error envelope."""
    return {s: {"model": ErrorEnvelope, "description": _MEANING[s]} for s in statuses}


bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")
