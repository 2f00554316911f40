"""Request models of the OpenAI/vLLM API this server speaks, and their validation.

Unknown fields are accepted (OpenAI clients send new ones all the time) and logged by the caller. Known
fields that ask for something this server does not do (logprobs, tools, penalties, ...) are refused with
a 400 naming the field rather than silently ignored: a caller must not get different semantics unknowingly.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadRequestError

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "LoadLoraAdapterRequest",
    "SamplingFields",
    "StreamOptions",
    "UnloadLoraAdapterRequest",
    "parse_request",
]

MAX_STOP = 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise BadRequestError(
                    f"Content part type {part.type!r} is not supported; only text.", param="messages"
                )
            parts.append(part.text)
        return "".join(parts)


class SamplingFields(_Model):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension (benchmarks use it for fixed-length generations)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise BadRequestError(f"At most {MAX_STOP} stop sequences are allowed.", param="stop")
        return tuple(s for s in stops if s)

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise BadRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequestError(f"{name} is not supported by this server; leave it at 0.", param=name)
        if self.logit_bias:
            raise BadRequestError("logit_bias is not supported by this server.", param="logit_bias")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise BadRequestError("logprobs are not supported by this server.", param="logprobs")
        if self.tools or self.functions or self.tool_choice not in (None, "none", "auto"):
            raise BadRequestError("Tool calling is not supported by this server.", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise BadRequestError("Only response_format type 'text' is supported.", param="response_format")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise BadRequestError("echo is not supported by this server.", param="echo")
        if self.logprobs:
            raise BadRequestError("logprobs are not supported by this server.", param="logprobs")
        if self.best_of not in (None, 1):
            raise BadRequestError("best_of is not supported by this server.", param="best_of")
        if self.suffix:
            raise BadRequestError("suffix is not supported by this server.", param="suffix")


class LoadLoraAdapterRequest(_Model):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(_Model):
    lora_name: str = Field(min_length=1, max_length=200)


M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], payload: Any) -> M:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(payload, dict):
        raise BadRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        message = (
            f"Missing required parameter: '{where}'." if kind == "missing" else f"{where}: {err.get('msg')}"
        )
        raise BadRequestError(message, param=param) from exc
