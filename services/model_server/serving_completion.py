"""POST /v1/completions: raw prompts (text or token ids, one or several), streamed or not."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from .errors import BadRequestError
from .protocol import CompletionRequest
from .serving import Call, OpenAIServing, collect, stream

__all__ = ["OpenAIServingCompletion"]

MAX_PROMPTS = 64


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def prompt_ids(self, req: CompletionRequest) -> list[list[int]]:
        tok = self.serving.tokenizer
        prompts = req.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise BadRequestError(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        vocab = len(tok)
        out = []
        for p in prompts:
            if isinstance(p, str):
                ids = list(tok(p)["input_ids"])  # with the tokenizer's special tokens, as vLLM does
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise BadRequestError(f"Token ids must be in [0, {vocab}).", param="prompt")
                ids = list(p)
            if not ids:
                raise BadRequestError("The prompt is empty.", param="prompt")
            out.append(ids)
        return out

    async def create(self, req: CompletionRequest, receive: Receive, headers: dict[str, str]) -> Response:
        req.check_supported()
        adapter = self.serving.resolve_adapter(req.model)
        prompts = self.prompt_ids(req)
        params = self.serving.sampling_params(req, req.max_tokens, [len(p) for p in prompts], "prompt")
        call = self.serving.start(prompts, params, adapter, "cmpl")

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
            body = {
                "id": call.id,
                "object": "text_completion",
                "created": call.created,
                "model": req.model,
                "choices": choices,
            }
            if req.stream_options and req.stream_options.include_usage:
                body["usage"] = usage
            return body

        def choice(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
            if text is None:
                return {}  # completions have no opening chunk
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        if req.stream:
            opts = req.stream_options
            return stream(
                self.serving, call, chunk, choice,
                include_usage=bool(opts and opts.include_usage),
                continuous_usage=bool(opts and opts.include_usage and opts.continuous_usage_stats),
                headers=headers,
            )  # fmt: skip
        await collect(self.serving, call, receive)
        return JSONResponse(self.render(call, req.model), headers=headers)

    @staticmethod
    def render(call: Call, model: str) -> dict[str, Any]:
        return {
            "id": call.id,
            "object": "text_completion",
            "created": call.created,
            "model": model,
            "choices": [
                {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in sorted(call.choices.items())
            ],
            "usage": call.usage(),
        }
