"""The model server's exception tree and the one place that turns exceptions into OpenAI's error envelope.

    ModelServerError            -> its own status, in OpenAI's envelope
    ├── BadRequestError         400 invalid_request_error (bad parameter, bad JSON, bad adapter)
    │   └── ContextLengthError  400 invalid_request_error, code context_length_exceeded
    ├── NotFoundError           404 invalid_request_error, code model_not_found (unknown model/adapter)
    ├── PayloadTooLargeError    413
    └── OverloadedError         503 server_error with Retry-After (queue full)

Handlers registered by `install_handlers` cover these, Starlette's HTTPException (unknown route -> 404,
wrong method -> 405) and anything else (500, generic message, traceback only in the server log). No
response ever carries FastAPI's `{"detail": ...}` or a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

__all__ = [
    "BadRequestError",
    "ContextLengthError",
    "ModelServerError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "error_body",
    "install_handlers",
]

log = logging.getLogger(__name__)


class ModelServerError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequestError(ModelServerError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    code = "context_length_exceeded"


class NotFoundError(ModelServerError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLargeError(ModelServerError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class OverloadedError(ModelServerError):
    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def _on_server_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelServerError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


_HTTP_MESSAGES = {404: "Not found: {path}", 405: "Method {method} is not allowed on {path}"}


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    template = _HTTP_MESSAGES.get(exc.status_code, "{detail}")
    message = template.format(path=request.url.path, method=request.method, detail=exc.detail)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, type_), status_code=exc.status_code, headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the caller.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("Internal server error", "server_error"), status_code=500)


def install_handlers(app: Starlette) -> None:
    app.add_exception_handler(ModelServerError, _on_server_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
