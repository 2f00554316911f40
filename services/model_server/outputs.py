"""What goes into the engine (EngineRequest) and what comes out of it, step by step (RequestOutput)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .sampling import SamplingParams

__all__ = ["ChoiceDelta", "EngineRequest", "RequestOutput"]


@dataclass
class ChoiceDelta:
    index: int
    text: str
    num_tokens: int  # tokens generated so far by this choice
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class RequestOutput:
    deltas: list[ChoiceDelta]
    time: float
    finished: bool = False
    error: str | None = None  # engine failure; the request is over
    tag: int = 0  # the request's tag: which prompt of a multi-prompt call this is


@dataclass(eq=False)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # the engine's internal adapter id
    tag: int = 0
    arrival: float = field(default_factory=time.monotonic)
    aborted: bool = False
    done: bool = False
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
