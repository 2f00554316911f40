"""GET /v1/report (stub; the implementation follows)."""

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter(tags=["report"])
