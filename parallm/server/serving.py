"""What completions and chat completions share: validation, sampling parameters, the per-choice
bookkeeping of streamed deltas, logprob formatting and server-sent events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from parallm.outputs import CompletionOutput, Logprob, RequestOutput
from parallm.sampling_params import SamplingParams
from parallm.server.async_engine import AsyncEngine, RequestFailed, RequestStream
from parallm.server.errors import APIError, bad_request, from_value_error
from parallm.server.protocol import (
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)

logger = logging.getLogger("parallm.server")

SSE_DONE = "data: [DONE]\n\n"

_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty")  # fmt: skip


@dataclass
class ServingContext:
    """What every handler needs: the engine and how the model is named and limited."""

    engine: AsyncEngine
    served_model_names: list[str]
    model_path: str | None = None

    @property
    def tokenizer(self) -> Any | None:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def model_name(self, requested: str | None) -> str:
        """The served name to report; 400 for a name this server does not serve."""
        if requested is None or requested in self.served_model_names:
            return requested or self.served_model_names[0]
        raise bad_request(
            f"The model `{requested}` does not exist; this server serves "
            f"{self.served_model_names}.",
            "model",
            "model_not_found",
        )

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise bad_request(f"this model has no tokenizer, so {what} cannot be used")
        return self.tokenizer

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        """400 for an invalid prompt, or one that leaves no room for ``max_tokens``."""
        try:
            self.engine.engine.validate_prompt(ids)
        except ValueError as e:
            code = "context_length_exceeded" if len(ids) > self.max_model_len else "invalid_value"
            raise bad_request(str(e), param, code) from None
        limit = self.max_model_len
        if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
            asked = f", plus {max_tokens} for the completion" if max_tokens else ""
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids)} tokens in the prompt{asked}. Please reduce the length of the "
                "prompt or the completion.",
                param,
                "context_length_exceeded",
            )


def sampling_params(req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """Engine sampling parameters from the request; 400 naming the field on a bad value."""
    kwargs: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, logprobs=logprobs, seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else (req.stop or []),
        min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
        stop_token_ids=req.stop_token_ids or [],
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
    )  # fmt: skip
    for name in _OPTIONAL_SAMPLING:
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise from_value_error(e, set(type(req).model_fields)) from None


def check_common(req: Any) -> None:
    """Checks that completions and chat share: options the engine cannot honour."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream is true", "stream_options")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")


@dataclass
class Choice:
    """One choice's output, accumulated over the deltas."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChoiceTracker:
    """Maps engine deltas to choices (``prompt_index * n + sample``) and counts tokens.

    A finished sample of a request whose other samples still run is repeated by the engine in
    later outputs; only its first finished delta counts.
    """

    def __init__(self, request_ids: list[str], prompt_lens: list[int], n: int) -> None:
        self._prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self.prompt_lens = prompt_lens
        self.n = n
        self._finished: set[int] = set()
        self.num_tokens: dict[int, int] = {}

    def deltas(self, out: RequestOutput) -> Iterator[tuple[int, CompletionOutput]]:
        """(choice index, delta) for each choice that progressed or finished."""
        base = self._prompt_index[out.request_id] * self.n
        for c in out.outputs:
            index = base + c.index
            if index in self._finished:
                continue
            if not c.token_ids and not c.text and c.finish_reason is None:
                continue
            if c.finish_reason is not None:
                self._finished.add(index)
            self.num_tokens[index] = self.num_tokens.get(index, 0) + len(c.token_ids)
            yield index, c

    def usage(self) -> Usage:
        prompt = sum(self.prompt_lens)
        completion = sum(self.num_tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)  # fmt: skip


async def collect(stream: RequestStream, tracker: ChoiceTracker) -> dict[int, Choice]:
    """Run a request to the end and gather each choice's whole output."""
    choices: dict[int, Choice] = {}
    async for out in stream:
        for index, delta in tracker.deltas(out):
            choice = choices.setdefault(index, Choice())
            choice.text.append(delta.text)
            choice.token_ids.extend(delta.token_ids)
            choice.logprobs.extend(delta.logprobs or [])
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
    return choices


# ---- logprobs ------------------------------------------------------------------------------


def _token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _by_rank(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], text_offset: int
) -> CompletionLogprobs:
    """The legacy completions format: tokens, their logprobs, top alternatives, text offsets."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = _token_text(token_id, entry[token_id])
        result.tokens.append(token)
        result.token_logprobs.append(entry[token_id].logprob)
        result.top_logprobs.append({_token_text(t, lp): lp.logprob for t, lp in _by_rank(entry)})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top: int
) -> list[TokenLogprob]:
    """The chat format: one record per token with its ``top`` likeliest alternatives."""
    records = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token_id]
        alternatives = [
            _top_logprob(t, lp)
            for t, lp in _by_rank(entry)
            if lp.rank is not None and lp.rank <= top
        ][:top]
        text = _token_text(token_id, chosen)
        records.append(
            TokenLogprob(
                token=text,
                logprob=chosen.logprob,
                bytes=list(text.encode()),
                top_logprobs=alternatives,
            )  # fmt: skip
        )
    return records


def _top_logprob(token_id: int, lp: Logprob) -> TopLogprob:
    text = _token_text(token_id, lp)
    return TopLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()))


# ---- server-sent events --------------------------------------------------------------------


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def error_from(exc: BaseException) -> APIError:
    """The APIError that reports ``exc`` to a client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestFailed):
        return APIError(str(exc), exc.status, code=str(exc.status))
    logger.exception("request failed", exc_info=exc)
    return APIError(f"{type(exc).__name__}: {exc}", 500, code="500")


class EventStreamResponse(StreamingResponse):
    """Server-sent events of one request; closing the request however the response ends.

    Starlette cancels the body iterator when the client disconnects, but a client that leaves
    before the first byte may stop the response before the iterator ever starts, so its
    ``finally`` would never run: closing here covers that case too.
    """

    def __init__(self, stream: RequestStream, events: AsyncIterator[str]) -> None:
        super().__init__(_sse_events(stream, events), media_type="text/event-stream")
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def _sse_events(stream: RequestStream, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wrap a request's events: an error becomes an error event, and the stream always ends
    with ``[DONE]``. A client that leaves cancels this generator, and ``close()`` aborts."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield sse(error_from(exc).body())
    finally:
        stream.close()
    yield SSE_DONE
