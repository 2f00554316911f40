"""Talking to upstreams. The one place where transport errors become `UpstreamError`."""

from gateway.upstream.client import UpstreamClient, UpstreamResponse
from gateway.upstream.sse import SSEFilter

__all__ = ["SSEFilter", "UpstreamClient", "UpstreamResponse"]
