"""`create_app(settings)`: the model server's routes over the engine; nothing happens at import time.

The lifespan loads the model folder, starts the engine thread, loads the `--lora-modules` adapters and
stops the engine on shutdown. Routes are thin: parse, hand to serving, map errors (errors.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .adapters import AdapterRegistry
from .engine import Engine
from .errors import BadRequestError, ModelServerError, PayloadTooLargeError, install_handlers
from .loader import load_model
from .metrics import EngineGauges, Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    parse_request,
)
from .serving import OpenAIServing
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .settings import Settings
from .sse import ClientGone

__all__ = ["ServerState", "create_app"]

log = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    registry: AdapterRegistry
    metrics: Metrics
    serving: OpenAIServing
    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    started: int


async def _build_state(settings: Settings) -> ServerState:
    loaded = await asyncio.to_thread(load_model, settings)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_model_len=loaded.max_model_len,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        eos_token_ids=loaded.eos_token_ids,
        device=loaded.device,
    )
    registry = AdapterRegistry(
        engine, settings.allowed_adapter_dirs, settings.max_loras, settings.max_lora_rank,
        settings.served_model_name,
    )  # fmt: skip

    def adapter_names() -> tuple[list[str], list[str]]:
        running = [registry.name_of(i) for i in engine.running_adapters()]
        waiting = [registry.name_of(i) for i in engine.waiting_adapters()]
        return running, waiting

    gauges = EngineGauges(
        engine.num_running, engine.num_waiting, engine.kv_usage, adapter_names, settings.max_loras
    )
    metrics = Metrics(settings.served_model_name, loaded.max_model_len, gauges)
    serving = OpenAIServing(
        engine, registry, loaded.tokenizer, metrics,
        served_model_name=settings.served_model_name, model_root=str(settings.model),
        max_model_len=loaded.max_model_len, max_n=settings.max_n,
    )  # fmt: skip
    return ServerState(
        settings, engine, registry, metrics, serving,
        OpenAIServingChat(serving), OpenAIServingCompletion(serving), int(time.time()),
    )  # fmt: skip


_warned_fields: set[str] = set()


async def _json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"Request body is larger than {limit} bytes.")
    # Read with a running limit: a chunked body has no content-length to check up front.
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLargeError(f"Request body is larger than {limit} bytes.")
        parts.append(part)
    body = b"".join(parts)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        ) from exc


def _log_ignored(fields: list[str]) -> None:
    new = [f for f in fields if f not in _warned_fields]
    if new:
        _warned_fields.update(new)
        log.info("ignoring request fields this server does not know: %s", ", ".join(new))


def _echo_headers(request: Request) -> dict[str, str]:
    rid = request.headers.get("x-request-id")
    return {"X-Request-Id": rid[:200]} if rid else {}


Handler = Callable[[Request], Awaitable[Response]]


def create_app(settings: Settings, on_ready: Callable[[], None] | None = None) -> Starlette:
    """The app; `on_ready` runs once the model and the start-up adapters are loaded."""
    holder: dict[str, ServerState] = {}

    def state() -> ServerState:
        return holder["state"]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        st = await _build_state(settings)
        st.engine.start()
        try:
            for module in settings.lora_modules:
                try:
                    await st.registry.load(module.name, str(module.path))
                except ModelServerError as exc:
                    raise RuntimeError(f"--lora-modules {module.name}={module.path}: {exc.message}") from exc
            holder["state"] = st
            if on_ready is not None:
                on_ready()
            yield
        finally:
            st.engine.stop()

    async def chat(request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await _json_body(request, settings.max_body_bytes))
        _log_ignored(req.ignored_fields())
        return await state().chat.create(req, request.receive, _echo_headers(request))

    async def completions(request: Request) -> Response:
        req = parse_request(CompletionRequest, await _json_body(request, settings.max_body_bytes))
        _log_ignored(req.ignored_fields())
        return await state().completion.create(req, request.receive, _echo_headers(request))

    async def models(request: Request) -> Response:
        return JSONResponse(state().serving.list_models(state().started))

    async def load_lora(request: Request) -> Response:
        req = parse_request(LoadLoraAdapterRequest, await _json_body(request, settings.max_body_bytes))
        await state().registry.load(req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload_lora(request: Request) -> Response:
        req = parse_request(UnloadLoraAdapterRequest, await _json_body(request, settings.max_body_bytes))
        await state().registry.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    async def health(request: Request) -> Response:
        # As vLLM: 200 with an empty body while the engine runs.
        if not state().engine.alive():
            return JSONResponse({"error": {"message": "engine is not running", "type": "server_error",
                                           "param": None, "code": None}}, status_code=503)  # fmt: skip
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    def client_aware(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientGone:
                return Response(status_code=499)  # nobody is listening; generation was aborted

        return wrapped

    routes = [
        Route("/v1/chat/completions", client_aware(chat), methods=["POST"]),
        Route("/v1/completions", client_aware(completions), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    install_handlers(app)
    return app
