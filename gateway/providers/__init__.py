"""Upstream API kinds: how each is addressed, authenticated and translated to and from OpenAI's API.

`provider_for(kind, options)` builds one provider per configured backend, from configuration only:

    kind        options used                               wire format
    local       -                                          OpenAI (vLLM, the CPU model server)
    openai      -                                          OpenAI and any OpenAI-compatible endpoint
    azure       deployment (required), api_version         Azure OpenAI deployment URLs, `api-key`
    anthropic   api_version (anthropic-version),           Anthropic Messages API, translated
                max_tokens_default

See docs/providers.md for configuration, the translation tables and the retry rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.azure import AzureProvider
from gateway.providers.base import ErrorClass, Passthrough, Provider, ProviderError, StreamTranslator
from gateway.providers.errors import classify_anthropic, classify_openai
from gateway.providers.openai import LocalProvider, OpenAIProvider

__all__ = [
    "KINDS",
    "AnthropicProvider",
    "AzureProvider",
    "ErrorClass",
    "LocalProvider",
    "OpenAIProvider",
    "Passthrough",
    "Provider",
    "ProviderError",
    "StreamTranslator",
    "classify_anthropic",
    "classify_openai",
    "provider_for",
]

KINDS = ("local", "openai", "azure", "anthropic")


def provider_for(kind: str, options: Mapping[str, Any] | None = None) -> Provider:
    """The provider for a backend of a tier of this `kind`. Raises ValueError for bad or missing options."""
    opts = options or {}
    kind = str(kind)
    if kind == "local":
        return LocalProvider()
    if kind == "openai":
        return OpenAIProvider()
    if kind == "azure":
        return AzureProvider(opts.get("deployment"), opts.get("api_version"))
    if kind == "anthropic":
        return AnthropicProvider(opts.get("api_version"), int(opts.get("max_tokens_default") or 4096))
    raise ValueError(f"unknown provider kind {kind!r}; expected one of {', '.join(KINDS)}")
