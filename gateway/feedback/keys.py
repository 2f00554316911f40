"""Redis keys of feedback (shared by the feedback route, the capture export and the report).

Outcomes are per tenant: a request id or workflow id is the client's, two tenants may use the same one.

    qlp:fb:{t:<tenant>}:r:<request id>   STRING  JSON {"outcome", "score", "note", "ts"}: the latest feedback
    qlp:fb:{t:<tenant>}:w:<workflow id>  STRING  the same, for a whole workflow
    qlp:fb:{t:<tenant>}:log              STREAM  every feedback event, field "r" (JSON)

A request's outcome is its own feedback, else its workflow's, else unknown.
"""

from __future__ import annotations

__all__ = ["log_key", "request_key", "workflow_key"]


def request_key(tenant: str, request_id: str) -> str:
    return f"qlp:fb:{{t:{tenant}}}:r:{request_id}"


def workflow_key(tenant: str, workflow: str) -> str:
    return f"qlp:fb:{{t:{tenant}}}:w:{workflow}"


def log_key(tenant: str) -> str:
    return f"qlp:fb:{{t:{tenant}}}:log"
