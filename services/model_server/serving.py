"""What chat and completions share: model resolution, context-length checks, usage and metrics per call.

max_tokens beyond the context is a 400, not a silent clamp (vLLM does the same): a caller that budgets on
max_tokens, like the gateway, learns its request cannot be served as asked. Without max_tokens a request
may use the rest of the context, as in vLLM.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Receive

from .adapters import AdapterRegistry
from .engine import Engine
from .errors import BadRequestError, ContextLengthError, ModelServerError, NotFoundError, error_body
from .metrics import Metrics
from .outputs import EngineRequest, RequestOutput
from .protocol import SamplingFields
from .sampling import SamplingParams
from .sse import SSEResponse, run_unless_disconnected, sse_event

__all__ = ["Call", "ChoiceState", "OpenAIServing", "collect", "stream"]


@dataclass
class ChoiceState:
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Call:
    """One HTTP call's engine requests (one per prompt), their choices, usage and metrics."""

    def __init__(
        self, serving: OpenAIServing, reqs: list[EngineRequest], n: int, queue: asyncio.Queue[RequestOutput]
    ) -> None:
        self.serving = serving
        self.reqs = reqs
        self.queue = queue
        self.n = n
        self.id = reqs[0].request_id
        self.created = int(time.time())
        self.choices = {t * n + i: ChoiceState() for t in range(len(reqs)) for i in range(n)}
        self._first_seen: set[int] = set()
        self._finished: set[int] = set()
        self._last_time: dict[int, float] = {}
        self.error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.reqs)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def observe(self, out: RequestOutput) -> list[tuple[int, str, str | None]]:
        """Record an engine output; return (choice index, text delta, finish reason) per changed choice."""
        metrics, req = self.serving.metrics, self.reqs[out.tag]
        if out.error is not None:
            self.error = out.error
        changed = []
        new_tokens = 0
        for d in out.deltas:
            index = out.tag * self.n + d.index
            choice = self.choices[index]
            new_tokens += d.num_tokens - choice.tokens
            choice.tokens = d.num_tokens
            choice.parts.append(d.text)
            choice.finish_reason = d.finish_reason
            changed.append((index, d.text, d.finish_reason))
        if new_tokens and out.tag not in self._first_seen:
            self._first_seen.add(out.tag)
            metrics.on_first_token(len(req.prompt_ids), out.time - req.arrival)
            metrics.on_tokens(new_tokens, None)
        elif new_tokens:
            metrics.on_tokens(new_tokens, out.time - self._last_time[out.tag])
        if new_tokens:
            self._last_time[out.tag] = out.time
        if out.finished:
            self._close_request(out.tag, out.time)
        return changed

    def close(self) -> None:
        """The call is over (also on disconnect): requests that did not finish count as aborted."""
        now = time.monotonic()
        for tag in range(len(self.reqs)):
            self._close_request(tag, now, default="abort")

    def _close_request(self, tag: int, when: float, default: str = "stop") -> None:
        if tag in self._finished:
            return
        self._finished.add(tag)
        req = self.reqs[tag]
        first = self.choices[tag * self.n]
        reason = first.finish_reason or default
        generated = sum(self.choices[tag * self.n + i].tokens for i in range(self.n))
        self.serving.metrics.on_finished(reason, len(req.prompt_ids), generated, when - req.arrival)


class OpenAIServing:
    def __init__(
        self,
        engine: Engine,
        registry: AdapterRegistry,
        tokenizer: Any,
        metrics: Metrics,
        *,
        served_model_name: str,
        model_root: str,
        max_model_len: int,
        max_n: int,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.base_name = served_model_name
        self.model_root = model_root
        self.max_model_len = max_model_len
        self.max_n = min(max_n, engine.max_batch_size)

    def resolve_adapter(self, model: str) -> str | None:
        """The engine's adapter id for `model`, None for the base model; 404 for anything else."""
        if model == self.base_name:
            return None
        adapter = self.registry.get(model)
        if adapter is None:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")
        return adapter.internal_id

    def sampling_params(
        self, req: SamplingFields, max_tokens: int | None, prompt_lens: list[int], param: str
    ) -> SamplingParams:
        if req.n > self.max_n:
            raise BadRequestError(f"n must be at most {self.max_n} on this server.", param="n")
        longest = max(prompt_lens)
        noun = "messages" if param == "messages" else "prompt"
        if longest >= self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your {noun} "
                f"resulted in {longest} tokens. Please reduce the length of the {noun}.",
                param=param,
            )
        if max_tokens is None:
            max_tokens = self.max_model_len - longest
        elif longest + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{longest + max_tokens} tokens ({longest} in the {noun}, {max_tokens} in the completion). "
                f"Please reduce the length of the {noun} or completion.",
                param="max_tokens",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop_strings(),
            seed=req.seed,
            n=req.n,
            ignore_eos=req.ignore_eos,
        )

    def start(
        self, prompts: list[list[int]], params: SamplingParams, adapter: str | None, prefix: str
    ) -> Call:
        """Submit one engine request per prompt (503 if the queue is full)."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        reqs = [
            EngineRequest(request_id=request_id, prompt_ids=ids, params=params, adapter=adapter, tag=t)
            for t, ids in enumerate(prompts)
        ]
        return Call(self, reqs, params.n, self.engine.submit_all(reqs))

    def outputs(self, call: Call) -> AsyncIterator[RequestOutput]:
        return self.engine.outputs(call.reqs, call.queue)

    def abort(self, call: Call) -> None:
        self.engine.abort_all(call.reqs)
        call.close()

    def model_card(self, name: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "permission": [],
        }
        if parent is None:
            card["max_model_len"] = self.max_model_len
        return card

    def list_models(self, started: int) -> dict[str, Any]:
        data = [self.model_card(self.base_name, self.model_root, None, started)]
        data += [
            self.model_card(a.name, str(a.spec.path), self.base_name, a.created) for a in self.registry.all()
        ]
        return {"object": "list", "data": data}


ChunkFn = Callable[[list[dict[str, Any]], dict[str, int] | None], dict[str, Any]]


async def collect(serving: OpenAIServing, call: Call, receive: Receive) -> None:
    """Run a call to the end for a non-streaming response; a disconnect aborts it (raises ClientGone)."""

    async def consume() -> None:
        async for out in serving.outputs(call):
            call.observe(out)

    try:
        await run_unless_disconnected(receive, consume())
    finally:
        call.close()
    if call.error is not None:
        raise ModelServerError(call.error)


def stream(
    serving: OpenAIServing,
    call: Call,
    make_chunk: ChunkFn,
    choice_part: Callable[[int, str | None, str | None], dict[str, Any]],
    include_usage: bool,
    continuous_usage: bool,
    headers: dict[str, str],
) -> SSEResponse:
    """SSE in OpenAI's format: `data: {chunk}` events, an optional usage chunk, then `data: [DONE]`.

    `choice_part(index, text, finish_reason)` renders one choice of a chunk (text None: the opening chunk).
    """

    def usage() -> dict[str, int] | None:
        return call.usage() if continuous_usage else None

    async def chunks() -> AsyncIterator[bytes]:
        opening = [choice_part(i, None, None) for i in sorted(call.choices)]
        if opening and opening[0]:
            yield sse_event(_dumps(make_chunk(opening, usage())))
        async for out in serving.outputs(call):
            changed = call.observe(out)
            if call.error is not None:
                # The stream has started: the error goes in-band, as vLLM and OpenAI do.
                yield sse_event(_dumps(error_body(call.error, "server_error")))
                break
            parts = [choice_part(i, text, reason) for i, text, reason in changed if text or reason]
            if parts:
                yield sse_event(_dumps(make_chunk(parts, usage())))
        else:
            if include_usage:
                final = make_chunk([], None)
                final["usage"] = call.usage()
                yield sse_event(_dumps(final))
        yield b"data: [DONE]\n\n"

    return SSEResponse(chunks(), on_close=lambda: serving.abort(call), headers=headers)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
