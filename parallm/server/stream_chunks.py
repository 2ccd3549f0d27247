"""Streamed chunks of completions and chat completions, encoded with msgspec.

A stream sends one chunk per choice per delta, so building and validating a pydantic model for
each (``protocol.CompletionResponse``, ``protocol.ChatCompletionChunk``) is a large share of the
server's work per token. These structs encode to the same JSON as those models (same fields, in
the same order, ``null`` where they have None; non-finite floats as ``null`` too) without the
validation: the values come from the engine, not from a client. Logprobs, when asked for, are
built with the pydantic models (``logprobs.py``) and passed here as plain dicts.
"""

from __future__ import annotations

from typing import Any

import msgspec

from parallm.server.protocol import Usage

_encoder = msgspec.json.Encoder()


class UsageCounts(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChunkChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: None = None


class CompletionChunk(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageCounts | None = None


class ChatDelta(msgspec.Struct):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatChunk(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageCounts | None = None


def usage_counts(usage: Usage | None) -> UsageCounts | None:
    if usage is None:
        return None
    return UsageCounts(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def completion_chunk(id: str, created: int, model: str, choices: list[CompletionChunkChoice],
                     usage: Usage | None = None) -> bytes:  # fmt: skip
    """One ``text_completion`` chunk as a server-sent event."""
    return _event(CompletionChunk(id, "text_completion", created, model, choices,
                                  usage_counts(usage)))  # fmt: skip


def chat_chunk(id: str, created: int, model: str, choices: list[ChatChunkChoice],
               usage: Usage | None = None) -> bytes:  # fmt: skip
    """One ``chat.completion.chunk`` as a server-sent event."""
    return _event(ChatChunk(id, "chat.completion.chunk", created, model, choices,
                            usage_counts(usage)))  # fmt: skip


def _event(chunk: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(chunk) + b"\n\n"
