"""OpenAI and every OpenAI-compatible endpoint (vLLM, the CPU model server, hosted compatibles).

The body goes upstream as the client sent it (minus steering fields), with the backend's model and, for
streams, `stream_options.include_usage` forced on: metering needs exact counts, and the SSE filter hides
the usage chunk from a client that did not ask for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.protocol import Endpoint
from gateway.providers.base import ErrorClass, Provider, drop_steering
from gateway.providers.errors import classify_openai

__all__ = ["LocalProvider", "OpenAIProvider", "openai_body"]

_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}


def openai_body(body: Mapping[str, Any], model: str, stream: bool) -> bytes:
    out = drop_steering(body)
    out["model"] = model
    if stream:
        opts = out.get("stream_options")
        out["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return orjson.dumps(out)


class OpenAIProvider(Provider):
    kind = "openai"

    def path(self, endpoint: Endpoint, model: str) -> str:
        self._check(endpoint)
        return _PATHS[endpoint]

    def headers(self, api_key: str | None, request_id: str) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept-Encoding": "identity", "X-Request-Id": request_id}
        if api_key:
            h["Authorization"] = f"Bearer {api_key}"
        return h

    def request_body(self, body: Mapping[str, Any], model: str, stream: bool) -> bytes:
        return openai_body(body, model, stream)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass:
        return classify_openai(status, headers, body)


class LocalProvider(OpenAIProvider):
    """A model server of ours (vLLM, on GPUs or CPUs): OpenAI's wire format."""

    kind = "local"
