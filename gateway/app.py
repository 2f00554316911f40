"""The gateway's app factory.

`create_app(settings)` returns an ASGI app in two parts:
  * the proxy routes (POST /v1/chat/completions, POST /v1/completions) are dispatched straight to
    `gateway.serving.handle`: no router, middleware or validation layer sits in front of the hot path
    (measured: bench/bench_gateway.py, docs/architecture.md);
  * everything else (models, health, and later ledger and admin routes) is a FastAPI app with typed
    dependencies, OpenAPI docs and OpenAI-style error handlers.
Nothing happens at import time; the lifespan owns the HTTP pool, the prober and the meter (Redis pool,
spool replayer).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from gateway.config import load_config
from gateway.errors import BodyTooLarge, GatewayError, envelope
from gateway.feedback import routes as feedback_routes
from gateway.http import header, request_id, send_error, with_request_id
from gateway.metering import routes as ledger_routes
from gateway.metrics import observe
from gateway.protocol import Endpoint
from gateway.report import routes as report_routes
from gateway.rollout import routes as rollout_routes
from gateway.routes import health, metrics, models, proxy_doc
from gateway.routes.responses import exact_integer_bounds
from gateway.runtime import Runtime
from gateway.serving import handle
from gateway.settings import Settings

__all__ = ["create_app", "create_app_from_env"]

log = logging.getLogger("qlp.gateway")

HOT_ROUTES: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}


def _error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    type_ = _STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    retry = "true" if status >= 500 or status == 429 else "false"
    return Response(
        envelope(message, type_, param, code),
        status_code=status,
        media_type="application/json",
        headers={**(headers or {}), "x-should-retry": retry},
    )


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the scope's path (routers included by FastAPI walked too)."""
    methods: set[str] = set()
    stack: list[Any] = list(app.router.routes)
    while stack:
        route = stack.pop()
        nested = getattr(route, "original_router", None)  # newer FastAPI keeps an included router whole
        if nested is not None:
            stack.extend(nested.routes)
        elif getattr(route, "methods", None) and route.matches(scope)[0] is not Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> Response:
        return Response(
            exc.body(), status_code=exc.status, media_type="application/json", headers=exc.response_headers()
        )

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; RFC 9110 wants every method.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request.scope))}
        return _error_response(exc.status_code, str(exc.detail), code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error_response(400, f"{loc}: {first.get('msg', 'invalid request')}", "invalid_value", loc or None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return _error_response(500, "internal error", "internal_error")


class Gateway:
    """The ASGI entry point: hot proxy paths by hand, the rest through FastAPI."""

    def __init__(self, runtime: Runtime, api: FastAPI) -> None:
        self.runtime = runtime
        self.api = api

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = HOT_ROUTES.get(scope["path"])
            if endpoint is not None:
                try:
                    x = await handle(self.runtime, endpoint, scope, receive, send)
                    observe(self.runtime.metrics, x, time.perf_counter())
                except Exception as exc:  # a bug: answer with the envelope if we still can, never a trace
                    log.error("unhandled error in %s: %s", scope["path"], type(exc).__name__, exc_info=exc)
                    with contextlib.suppress(Exception):
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 500,
                                "headers": [(b"content-type", b"application/json")],
                            }
                        )
                        await send(
                            {
                                "type": "http.response.body",
                                "body": envelope("internal error", "internal_error", None, "internal_error"),
                            }
                        )
                return
        if scope["type"] == "http":
            # Every response names its request, the router's own 404 and 405 included.
            rid = request_id(header(scope["headers"], b"x-request-id"))
            await self._bounded_api(scope, receive, with_request_id(send, rid))
            return
        await self.api(scope, receive, send)

    async def _bounded_api(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """FastAPI routes under the same body limit as the proxy routes (FastAPI has none of its own: a
        request to, say, POST /v1/admin/keys would be read whole into memory, key or no key)."""
        limit = self.runtime.settings.max_body_bytes
        declared = header(scope["headers"], b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            too_large = BodyTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
            await send_error(send, too_large, [])
            return
        seen = 0

        async def bounded_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # a chunked body, no length declared: refused once it passes the limit
                raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self.api(scope, bounded_receive, send)


def create_app(settings: Settings | None = None) -> Gateway:
    settings = settings or Settings()
    runtime = Runtime(settings, load_config(settings.config))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        # What start-up made (app, routes, config, clients) lives as long as the process: moved out of the
        # collector's sight, full collections under load only walk what requests allocate.
        gc.freeze()
        try:
            yield
        finally:
            await runtime.stop()

    api = FastAPI(title="QLP gateway", version="0.1.0", lifespan=lifespan)
    api.state.runtime = runtime
    _install_error_handlers(api)
    api.include_router(models.router)
    api.include_router(health.router)
    api.include_router(proxy_doc.router)
    api.include_router(ledger_routes.router)
    api.include_router(feedback_routes.router)
    api.include_router(report_routes.router)
    api.include_router(rollout_routes.router)
    api.include_router(metrics.router)

    def openapi() -> dict[str, Any]:
        first = api.openapi_schema is None
        doc = FastAPI.openapi(api)
        if first:
            exact_integer_bounds(doc)
        return doc

    api.openapi = openapi  # type: ignore[method-assign]
    return Gateway(runtime, api)


def create_app_from_env() -> Gateway:
    """uvicorn factory (`--factory gateway.app:create_app_from_env`): settings from QLP_* variables."""
    return create_app(Settings())
