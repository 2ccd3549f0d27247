"""Streamed chunks encoded with msgspec are the same bytes as the pydantic response models'
JSON (the wire format clients saw before): completions and chat, with usage, logprobs
(non-finite ones as null), stop reasons of both types and text that needs escaping."""

from __future__ import annotations

import pytest

from parallm.outputs import Logprob
from parallm.server.logprobs import chat_logprobs, completion_logprobs
from parallm.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatLogprobs,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from parallm.server.stream_chunks import ChatChunkChoice as FastChatChoice
from parallm.server.stream_chunks import (
    ChatDelta,
    chat_chunk,
    completion_chunk,
)
from parallm.server.stream_chunks import CompletionChunkChoice as FastCompletionChoice

TEXT = 'a "quoted"\n\ttab \\ é 日本 \x01 </script>'
ENTRY = {7: Logprob(-0.25, 1, "é"), 9: Logprob(float("-inf"), 2, None)}
USAGE = Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)


def _sse(model) -> bytes:
    return f"data: {model.model_dump_json()}\n\n".encode()


@pytest.mark.parametrize("finish, stop", [(None, None), ("stop", "END"), ("stop", 2),
                                          ("length", None)])  # fmt: skip
@pytest.mark.parametrize("usage", [None, USAGE])
@pytest.mark.parametrize("with_logprobs", [False, True])
def test_completion_chunks_match_the_pydantic_json(finish, stop, usage, with_logprobs) -> None:
    logprobs = completion_logprobs([7, 9], [ENTRY, ENTRY], 4) if with_logprobs else None
    expected = _sse(CompletionResponse(
        id="cmpl-1", created=17, model="m", usage=usage,
        choices=[CompletionChoice(index=3, text=TEXT, logprobs=logprobs, finish_reason=finish,
                                  stop_reason=stop)],
    ))  # fmt: skip
    fast = FastCompletionChoice(3, TEXT, logprobs.model_dump() if logprobs else None, finish, stop)
    assert completion_chunk("cmpl-1", 17, "m", [fast], usage) == expected


def test_the_usage_chunk_matches_the_pydantic_json() -> None:
    expected = _sse(CompletionResponse(id="c", created=1, model="m", choices=[], usage=USAGE))
    assert completion_chunk("c", 1, "m", [], USAGE) == expected
    expected = _sse(ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=USAGE))
    assert chat_chunk("c", 1, "m", [], USAGE) == expected


@pytest.mark.parametrize("role, content", [("assistant", ""), (None, TEXT)])
@pytest.mark.parametrize("with_logprobs", [False, True])
def test_chat_chunks_match_the_pydantic_json(role, content, with_logprobs) -> None:
    logprobs = ChatLogprobs(content=chat_logprobs([7], [ENTRY], 2)) if with_logprobs else None
    expected = _sse(ChatCompletionChunk(
        id="chatcmpl-1", created=5, model="m",
        choices=[ChatChunkChoice(index=1, delta=DeltaMessage(role=role, content=content),
                                 logprobs=logprobs, finish_reason="length", stop_reason=None)],
    ))  # fmt: skip
    fast = FastChatChoice(1, ChatDelta(role, content),
                          logprobs.model_dump() if logprobs else None, "length", None)  # fmt: skip
    assert chat_chunk("chatcmpl-1", 5, "m", [fast]) == expected
