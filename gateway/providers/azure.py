"""Azure OpenAI: OpenAI's wire format behind deployment URLs, an `api-version` query and an `api-key` header.

    POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}
    api-key: <key>

`base_url` is the resource endpoint (https://<resource>.openai.azure.com). The deployment and api-version
come from the backend's configuration and are checked when it is loaded; the request's `model` never
reaches the URL (Azure ignores the body's `model`: the deployment decides).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.protocol import Endpoint
from gateway.providers.base import ErrorClass, Provider
from gateway.providers.errors import classify_openai
from gateway.providers.openai import openai_body

__all__ = ["DEFAULT_API_VERSION", "AzureProvider"]

# The GA version that has stream_options.include_usage (needed for exact streamed usage).
DEFAULT_API_VERSION = "2024-10-21"
_DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_PATHS: dict[str, str] = {"chat": "chat/completions", "completions": "completions"}


class AzureProvider(Provider):
    kind = "azure"

    def __init__(self, deployment: str | None, api_version: str | None = None) -> None:
        if not deployment or not _DEPLOYMENT.match(deployment):
            raise ValueError("azure backends need `deployment`: letters, digits, '.', '_' or '-' (at most 64)")
        version = api_version or DEFAULT_API_VERSION
        if not _API_VERSION.match(version):
            raise ValueError(f"azure `api_version` must look like 2024-10-21 or 2025-01-01-preview, got {version!r}")
        self.deployment = deployment
        self.api_version = version

    def path(self, endpoint: Endpoint, model: str) -> str:
        self._check(endpoint)
        return f"/openai/deployments/{self.deployment}/{_PATHS[endpoint]}?api-version={self.api_version}"

    def headers(self, api_key: str | None, request_id: str) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept-Encoding": "identity", "X-Request-Id": request_id}
        if api_key:
            h["api-key"] = api_key
        return h

    def request_body(self, body: Mapping[str, Any], model: str, stream: bool) -> bytes:
        return openai_body(body, model, stream)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass:
        return classify_openai(status, headers, body)
