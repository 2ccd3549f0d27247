"""``POST /v1/chat/completions``: apply the model's chat template, then generate ``n`` choices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from parallm.outputs import CompletionOutput
from parallm.server.async_engine import EngineRequest, RequestStream
from parallm.server.errors import bad_request
from parallm.server.logprobs import chat_logprobs
from parallm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    now_s,
    random_id,
)
from parallm.server.serving import (
    Choice,
    ChoiceTracker,
    ServingContext,
    check_common,
    collect,
    sampling_params,
)
from parallm.server.sse import EventStreamResponse
from parallm.server.stream_chunks import ChatChunkChoice, ChatDelta, chat_chunk


async def create_chat_completion(
    ctx: ServingContext, req: ChatCompletionRequest
) -> ChatCompletionResponse | StreamingResponse:
    """Validate, submit and answer one chat completions request (streaming or not)."""
    model = ctx.model_name(req.model)
    _check_request(ctx, req)
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = req.top_logprobs or 0
    params = sampling_params(req, max_tokens, top if req.logprobs else None)
    # Rendering the template, tokenizing and checking take milliseconds: keep them off the loop.
    prompt, ids = await asyncio.to_thread(_render, ctx, req, max_tokens)
    request_id = random_id("chatcmpl")
    stream = ctx.engine.submit([EngineRequest(request_id, ids, params, prompt)])
    tracker = ChoiceTracker(stream.request_ids, [len(ids)], req.n)
    if req.stream:
        return EventStreamResponse(stream, _events(req, stream, tracker, request_id, model))
    try:
        choices = await collect(stream, tracker)
    finally:
        stream.close()
    return ChatCompletionResponse(
        id=request_id,
        model=model,
        choices=[_choice(req, i, choices[i]) for i in sorted(choices)],
        usage=tracker.usage(),
    )


def _check_request(ctx: ServingContext, req: ChatCompletionRequest) -> None:
    check_common(ctx, req)
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")


def _render(
    ctx: ServingContext, req: ChatCompletionRequest, max_tokens: int | None
) -> tuple[str, list[int]]:
    """The conversation as prompt text and token ids, checked against the context."""
    text = render_chat(ctx, req.messages, req.add_generation_prompt)
    ctx.check_text_fits(text, max_tokens, "messages")
    # The template already holds the special tokens it wants (BOS included).
    ids = ctx.require_tokenizer("chat completions")(text, add_special_tokens=False)["input_ids"]
    ctx.check_prompt(ids, max_tokens, "messages")
    return text, ids


def render_chat(
    ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool
) -> str:
    """The conversation as prompt text, through the model's chat template."""
    tokenizer = ctx.require_tokenizer("chat messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except ValueError as e:  # transformers' way of saying there is no chat template
        raise bad_request(f"cannot apply the chat template: {e}", "messages") from None


def _logprobs(req: ChatCompletionRequest, delta: CompletionOutput | Choice) -> ChatLogprobs | None:
    if not req.logprobs:
        return None
    return ChatLogprobs(
        content=chat_logprobs(delta.token_ids, delta.logprobs or [], req.top_logprobs or 0)
    )


def _choice(req: ChatCompletionRequest, index: int, choice: Choice) -> ChatChoice:
    return ChatChoice(
        index=index,
        message=AssistantMessage(content="".join(choice.text)),
        logprobs=_logprobs(req, choice),
        finish_reason=choice.finish_reason,
        stop_reason=choice.stop_reason,
    )


async def _events(
    req: ChatCompletionRequest,
    stream: RequestStream,
    tracker: ChoiceTracker,
    request_id: str,
    model: str,
) -> AsyncIterator[bytes]:
    created = now_s()
    options = req.stream_options
    continuous = options is not None and options.continuous_usage_stats

    def chunk(choices: list[ChatChunkChoice], usage: bool = False) -> bytes:
        counts = tracker.usage() if usage or (continuous and choices) else None
        return chat_chunk(request_id, created, model, choices, counts)

    # As OpenAI does: every choice first gets a chunk that carries only the role.
    for index in range(req.n):
        yield chunk([ChatChunkChoice(index, ChatDelta("assistant", ""))])
    async for out in stream:
        for index, delta in tracker.deltas(out):
            logprobs = _logprobs(req, delta)
            yield chunk([ChatChunkChoice(
                index, ChatDelta(None, delta.text),
                None if logprobs is None else logprobs.model_dump(), delta.finish_reason,
                delta.stop_reason,
            )])  # fmt: skip
    if options and options.include_usage:
        yield chunk([], usage=True)
