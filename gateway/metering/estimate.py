"""Local token estimates, for budgets before the call and for streams that end without a usage chunk.

Rough on purpose (about 4 characters per token, plus a few tokens of chat template per message): they
size reservations and bill streams that broke, and those records are marked `estimated`. Exact counts
always come from the upstream's usage when it sends one.
"""

from __future__ import annotations

from typing import Any

from gateway.protocol import ParsedRequest

__all__ = ["completion_tokens_of_body", "prompt_tokens", "text_tokens"]

CHARS_PER_TOKEN = 4
PER_MESSAGE = 4  # role markers and separators of a chat template


def text_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                n += len(part["text"])
            elif isinstance(part, dict):
                n += 1000  # an image or audio part: a flat guess (providers bill these in hundreds)
        return n
    return 0


def prompt_tokens(req: ParsedRequest) -> int:
    body = req.body
    if req.endpoint == "chat":
        msgs = body.get("messages") or []
        chars = 0
        for m in msgs:
            if isinstance(m, dict):
                chars += _content_chars(m.get("content"))
                if m.get("tool_calls") is not None or m.get("function_call") is not None:
                    chars += len(str(m.get("tool_calls") or m.get("function_call")))
        tools = body.get("tools")
        if tools:
            chars += len(str(tools))
        return max(1, text_tokens(chars) + PER_MESSAGE * len(msgs))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(1, text_tokens(len(prompt)))
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return len(prompt)  # token ids: exact
    if isinstance(prompt, list):
        return max(1, sum(text_tokens(len(p)) for p in prompt if isinstance(p, str)))
    return 1


def completion_tokens_of_body(parsed: Any) -> int:
    """Output tokens of a non-streamed response that came without usage: from its text, at least 1."""
    chars = 0
    if isinstance(parsed, dict):
        for choice in parsed.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            msg = choice.get("message")
            if isinstance(msg, dict):
                chars += _content_chars(msg.get("content"))
                if msg.get("tool_calls"):
                    chars += len(str(msg["tool_calls"]))
            if isinstance(choice.get("text"), str):
                chars += len(choice["text"])
    return max(1, text_tokens(chars))
