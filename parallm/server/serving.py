"""What completions and chat completions share: validation, sampling parameters and the
per-choice bookkeeping of streamed deltas."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from parallm.outputs import CompletionOutput, Logprob, RequestOutput
from parallm.sampling_params import SamplingParams
from parallm.server.async_engine import AsyncEngine, RequestStream
from parallm.server.errors import bad_request, from_value_error
from parallm.server.protocol import Usage

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
        try:
            self.engine.engine.validate_prompt(ids)
        except ValueError as e:
            raise bad_request(str(e), param) from None


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
