"""Per-request sampling parameters, validated where they enter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

_MAX_LOGPROBS = 20
# torch.Generator.manual_seed takes an unsigned 64-bit seed. It also takes negative ones down to
# -2**63, but maps them onto seed + 2**64 (-1 and 2**64 - 1 give the same samples), so negative
# seeds are refused rather than silently aliased.
MAX_SEED = 2**64 - 1


@dataclass(init=False)
class SamplingParams:
    """How to sample one request, mirroring vLLM's ``SamplingParams``.

    ``temperature=0`` means greedy. ``top_k`` of 0 or -1 disables top-k.
    ``max_tokens=None`` generates until EOS or the model's context is full.
    ``logprobs=k`` returns the chosen token's log-probability and the top ``k``
    alternatives, computed from the raw model logits (before temperature or penalties).
    ``seed`` is an integer in [0, 2**64 - 1]; sample ``i`` of ``n`` uses ``(seed + i) mod 2**64``.
    ``prompt_logprobs=k`` returns, for every prompt token after the first, its log-probability
    given the tokens before it and the top ``k`` alternatives (``RequestOutput.prompt_logprobs``).
    ``detokenize=False`` returns token ids only: the outputs' text is empty.
    Unknown keywords raise ``ValueError`` naming the allowed ones.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True

    def __init__(self, **kwargs: object) -> None:
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"SamplingParams got unknown keyword(s) {unknown}; allowed: {sorted(names)}"
            )
        for name, f in names.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: no penalties and no logprobs."""
        return self.greedy and self.history_free

    @property
    def history_free(self) -> bool:
        """Sampling needs neither past output tokens (penalties) nor per-token logprobs."""
        return self.logprobs is None and self.penalty_free

    @property
    def penalty_free(self) -> bool:
        """No repetition, presence or frequency penalty: a token's distribution does not
        depend on the output tokens before it."""
        return (
            self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )

    def _validate(self) -> None:
        _check_int("n", self.n, low=1)
        _check_number("temperature", self.temperature, "must be >= 0", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, low=-1, note="-1 or 0 disable it")
        _check_number("min_p", self.min_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "must be > 0", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0, high=_MAX_LOGPROBS)
        if not isinstance(self.detokenize, bool):
            raise ValueError(f"detokenize must be true or false, got {self.detokenize!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0)
        if self.stop and not self.detokenize:
            raise ValueError(
                "stop strings need detokenize=True (they are matched in the text); "
                "use stop_token_ids instead"
            )


def _check_int(name: str, value: object, low: int, high: int | None = None, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        extra = f" ({note})" if note else ""
        raise ValueError(f"{name} must be {bound}{extra}, got {value}")


def _check_number(name: str, value: object, rule: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} {rule}, got {value}")
