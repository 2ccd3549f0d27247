"""``POST /v1/completions``: one engine request per prompt, ``n`` choices each."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from parallm.outputs import PromptLogprobs, RequestOutput
from parallm.server.async_engine import EngineRequest, RequestStream
from parallm.server.errors import bad_request
from parallm.server.logprobs import completion_logprobs
from parallm.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    now_s,
    random_id,
)
from parallm.server.serving import (
    Choice,
    ChoiceTracker,
    ServingContext,
    check_common,
    check_engine_can_honour,
    collect,
    sampling_params,
)
from parallm.server.sse import EventStreamResponse
from parallm.server.stream_chunks import CompletionChunkChoice, completion_chunk


@dataclass
class Prompt:
    token_ids: list[int]
    text: str  # for echo; decoded from the ids when the prompt came as ids


async def create_completion(
    ctx: ServingContext, req: CompletionRequest
) -> CompletionResponse | StreamingResponse:
    """Validate, submit and answer one completions request (streaming or not)."""
    model = ctx.model_name(req.model)
    _check_request(ctx, req)
    params = sampling_params(req, req.max_tokens, req.logprobs)
    if req.prompt_logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=req.prompt_logprobs)
    check_engine_can_honour(ctx, params, req)
    # Tokenizing and checking long prompts takes milliseconds: keep it off the event loop.
    prompts = await asyncio.to_thread(_prepare_prompts, ctx, req)
    request_id = random_id("cmpl")
    stream = ctx.engine.submit(
        [EngineRequest(f"{request_id}-{i}", p.token_ids, params, p.text)
         for i, p in enumerate(prompts)]
    )  # fmt: skip
    tracker = ChoiceTracker(stream.request_ids, [len(p.token_ids) for p in prompts], req.n)
    if req.stream:
        events = _events(req, stream, tracker, prompts, request_id, model)
        return EventStreamResponse(stream, events)
    scored: dict[str, PromptLogprobs] = {}  # request id -> prompt logprobs
    try:
        choices = await collect(_keeping_prompt_logprobs(stream, scored), tracker)
    finally:
        stream.close()
    return CompletionResponse(
        id=request_id,
        model=model,
        choices=[
            _choice(req, i, choices[i], prompts[i // req.n],
                    scored.get(stream.request_ids[i // req.n]))
            for i in sorted(choices)
        ],
        usage=tracker.usage(),
    )  # fmt: skip


async def _keeping_prompt_logprobs(
    stream: RequestStream, scored: dict[str, PromptLogprobs]
) -> AsyncIterator[RequestOutput]:
    """The stream's outputs, keeping the prompt logprobs that come with a request's first."""
    async for out in stream:
        if out.prompt_logprobs is not None:
            scored[out.request_id] = out.prompt_logprobs
        yield out


def _check_request(ctx: ServingContext, req: CompletionRequest) -> None:
    check_common(ctx, req)
    if req.suffix:
        raise bad_request("suffix is not supported by this server", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (beam search is not supported)", "best_of")
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available when stream is true", "prompt_logprobs")
    if req.echo and req.logprobs is not None:
        raise bad_request(
            "echo with logprobs is not supported; prompt_logprobs gives the prompt's logprobs",
            "logprobs",
        )


def _prepare_prompts(ctx: ServingContext, req: CompletionRequest) -> list[Prompt]:
    """The request's prompts as token ids (and text), each checked against the context."""
    prompt = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    return [_encode_one(ctx, p, req.max_tokens) for p in prompt]


def _encode_one(ctx: ServingContext, prompt: str | list[int], max_tokens: int | None) -> Prompt:
    """One prompt, checked before the expensive step: text before tokenizing, ids before
    decoding (an id outside the vocabulary would make the decoder raise)."""
    if isinstance(prompt, str):
        ctx.check_text_fits(prompt, max_tokens, "prompt")
        ids = ctx.require_tokenizer("text prompts")(prompt)["input_ids"]
        ctx.check_prompt(ids, max_tokens, "prompt")
        return Prompt(ids, prompt)
    ids = list(prompt)
    ctx.check_prompt(ids, max_tokens, "prompt")
    tokenizer = ctx.tokenizer
    return Prompt(ids, tokenizer.decode(ids) if tokenizer is not None else "")


def _choice(
    req: CompletionRequest,
    index: int,
    choice: Choice,
    prompt: Prompt,
    prompt_logprobs: PromptLogprobs | None = None,
) -> CompletionChoice:
    prefix = prompt.text if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(choice.token_ids, choice.logprobs, len(prefix))
    return CompletionChoice(
        index=index, text=prefix + "".join(choice.text), logprobs=logprobs,
        finish_reason=choice.finish_reason, stop_reason=choice.stop_reason,
        prompt_logprobs=_prompt_logprobs(prompt_logprobs),
    )  # fmt: skip


def _prompt_logprobs(
    entries: PromptLogprobs | None,
) -> list[dict[int, PromptLogprob] | None] | None:
    if entries is None:
        return None
    return [
        None if entry is None else {
            token_id: PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                    decoded_token=lp.decoded_token)
            for token_id, lp in entry.items()
        }
        for entry in entries
    ]  # fmt: skip


async def _events(
    req: CompletionRequest,
    stream: RequestStream,
    tracker: ChoiceTracker,
    prompts: list[Prompt],
    request_id: str,
    model: str,
) -> AsyncIterator[bytes]:
    created = now_s()
    options = req.stream_options
    started: set[int] = set()
    offsets: dict[int, int] = {}  # logprobs.text_offset of each choice's next token
    async for out in stream:
        for index, delta in tracker.deltas(out):
            text = delta.text
            if index not in started:
                started.add(index)
                text = (prompts[index // req.n].text if req.echo else "") + text
            logprobs = None
            if req.logprobs is not None:
                start = offsets.get(index, 0)
                logprobs = completion_logprobs(delta.token_ids, delta.logprobs or [], start)
                offsets[index] = start + sum(len(t) for t in logprobs.tokens)
                logprobs = logprobs.model_dump()
            choice = CompletionChunkChoice(index, text, logprobs, delta.finish_reason,
                                           delta.stop_reason)  # fmt: skip
            usage = tracker.usage() if options and options.continuous_usage_stats else None
            yield completion_chunk(request_id, created, model, [choice], usage)
    if options and options.include_usage:
        yield completion_chunk(request_id, created, model, [], tracker.usage())
