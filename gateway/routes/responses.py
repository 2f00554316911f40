"""What the OpenAPI description says about errors and credentials, shared by every route declaration.

Every error is OpenAI's envelope (gateway/errors.py); `errors(...)` documents the statuses a route can
answer with it. `bearer` declares the API key scheme; it never refuses anything itself (auto_error off):
the meter checks keys (gateway/metering/meter.py), and the proxy routes are not FastAPI routes at all.
`exact_integer_bounds` undoes FastAPI writing every bound as a float (a bound must be exact in a float to
survive: hence `lt=2**63`, never `le=2**63 - 1`).
"""

from __future__ import annotations

from typing import Any

from fastapi.security import HTTPBearer
from pydantic import BaseModel

__all__ = ["ErrorEnvelope", "bearer", "errors", "exact_integer_bounds"]


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


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def exact_integer_bounds(node: Any) -> None:
    """Write an integer schema's bounds as integers, in place. FastAPI's OpenAPI model holds them as floats,
    and a client's generator or validator working in floats gets the edge wrong (2**63 - 2 read as 2.0**63)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in _BOUNDS:
                if isinstance(node.get(k), float) and node[k].is_integer():
                    node[k] = int(node[k])
        for v in node.values():
            exact_integer_bounds(v)
    elif isinstance(node, list):
        for v in node:
            exact_integer_bounds(v)
