"""POST /v1/chat/completions: the model's chat template, then generation, streamed or not."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from .errors import BadRequestError
from .protocol import ChatCompletionRequest
from .serving import Call, OpenAIServing, collect, stream

__all__ = ["OpenAIServingChat"]


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        tok = self.serving.tokenizer
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises its own errors for conversations a template rejects
            raise BadRequestError(
                f"The chat template rejected these messages: {exc}", param="messages"
            ) from exc
        # The template writes the special tokens itself.
        return list(tok(text, add_special_tokens=False)["input_ids"])

    async def create(self, req: ChatCompletionRequest, receive: Receive, headers: dict[str, str]) -> Response:
        req.check_supported()
        adapter = self.serving.resolve_adapter(req.model)
        ids = self.prompt_ids(req)
        params = self.serving.sampling_params(req, req.effective_max_tokens(), [len(ids)], "messages")
        call = self.serving.start([ids], params, adapter, "chatcmpl")

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
            body = {
                "id": call.id,
                "object": "chat.completion.chunk",
                "created": call.created,
                "model": req.model,
                "choices": choices,
            }
            if req.stream_options and req.stream_options.include_usage:
                body["usage"] = usage
            return body

        def choice(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
            # text None: the opening chunk, which carries the role (vLLM and OpenAI send it first).
            delta = (
                {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            )
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

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
            "object": "chat.completion",
            "created": call.created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in sorted(call.choices.items())
            ],
            "usage": call.usage(),
        }
