"""What completions and chat completions share: validation, sampling parameters and the
per-choice bookkeeping of streamed deltas."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from parallm.outputs import CompletionOutput, Logprob, RequestOutput
from parallm.sampling_params import SamplingParams
from parallm.server.async_engine import AsyncEngine, RequestStream
from parallm.server.errors import APIError, bad_request, from_value_error
from parallm.server.protocol import Usage

_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty")  # fmt: skip


@dataclass
class ServingContext:
    """What every handler needs: the engine and how the model is named and limited."""

    engine: AsyncEngine
    served_model_names: list[str]
    model_path: str | None = None
    # The most characters one token stands for (chars_per_token); None: no such bound.
    max_chars_per_token: int | None = None

    @property
    def tokenizer(self) -> Any | None:
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    def model_name(self, requested: str | None) -> str:
        """The served name to report; 404 for a name this server does not serve (as OpenAI and
        vLLM answer)."""
        if requested is None or requested in self.served_model_names:
            return requested or self.served_model_names[0]
        raise APIError(
            f"The model `{requested}` does not exist; this server serves "
            f"{self.served_model_names}.",
            404,
            "model",
            "model_not_found",
        )

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise bad_request(f"this model has no tokenizer, so {what} cannot be used")
        return self.tokenizer

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 naming ``param`` for an id outside the vocabulary (before anything decodes it)."""
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{param} must hold token ids in [0, {vocab}), got {bad[:5]}", param)

    def check_text_fits(self, text: str, max_tokens: int | None, param: str) -> None:
        """400 for text that cannot fit the context whatever it tokenizes to, so that an
        oversized prompt is refused without tokenizing it (see chars_per_token)."""
        if self.max_chars_per_token is None:
            return
        room = max(self.max_model_len - max(max_tokens or 1, 1), 0)  # tokens a prompt may have
        if len(text) > room * self.max_chars_per_token:
            asked = f", leaving room for {max_tokens} completion tokens" if max_tokens else ""
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"the prompt is {len(text)} characters long: more than {room} tokens can hold "
                f"(one token stands for at most {self.max_chars_per_token} characters){asked}. "
                "Please reduce the length of the prompt or the completion.",
                param,
                "context_length_exceeded",
            )

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        """400 for an invalid prompt, or one that leaves no room for ``max_tokens``."""
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
        self.check_token_ids(ids, param)
        try:
            self.engine.engine.validate_prompt(ids)
        except ValueError as e:
            raise bad_request(str(e), param) from None


def check_engine_can_honour(ctx: ServingContext, params: SamplingParams, req: Any) -> None:
    """400 naming the field for what this engine cannot do (stop strings without a tokenizer)."""
    try:
        ctx.engine.engine.validate_params(params)
    except ValueError as e:
        raise from_value_error(e, set(type(req).model_fields)) from None


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


# Options that constrain the output (tool calling, structured output), which this server does
# not implement yet, with the values that ask for nothing (what clients send by default).
# Anything else is refused: no client may take unconstrained text for a tool call or for JSON.
_UNSUPPORTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "tools": ("null or []", lambda v: v is None or v == []),
    "tool_choice": ('null, "none" or "auto"', lambda v: v in (None, "none", "auto")),
    "functions": ("null or []", lambda v: v is None or v == []),
    "function_call": ('null, "none" or "auto"', lambda v: v in (None, "none", "auto")),
    "response_format": ('null or {"type": "text"}', lambda v: v in (None, {"type": "text"})),
    "structured_outputs": ("null", lambda v: v is None),
    "guided_json": ("null", lambda v: v is None),
    "guided_regex": ("null", lambda v: v is None),
    "guided_choice": ("null", lambda v: v is None),
    "guided_grammar": ("null", lambda v: v is None),
}


def check_common(ctx: ServingContext, req: Any) -> None:
    """Checks that completions and chat share: options the engine cannot honour."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream is true", "stream_options")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    for name, (allowed, asks_nothing) in _UNSUPPORTED.items():
        if name in type(req).model_fields and not asks_nothing(getattr(req, name)):
            raise bad_request(
                f"{name} is not supported by this server (no tool calling or structured output "
                f"yet); allowed: {allowed}",
                name,
                "unsupported_parameter",
            )
    if req.stop_token_ids:
        ctx.check_token_ids(req.stop_token_ids, "stop_token_ids")


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
