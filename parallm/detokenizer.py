"""Incremental detokenization: output token ids -> streamable text, with stop strings.

Text comes from the prefix/read-offset algorithm: each new token is decoded together with a few
tokens before it, and only the text beyond the context's own decoding is new. The context makes
leading spaces come out as they do in the full decode (sentencepiece decoders strip the space of
the first token they see). New text is held back while it ends in U+FFFD (its last bytes may
start a multi-byte character) and, for ByteFallback decoders, while a run of ``<0xNN>`` tokens
is still open (an invalid run turns all of its bytes into U+FFFD, retroactively).

The result matches ``tokenizer.decode(prompt + output)`` past the prompt's own text, which is
``tokenizer.decode(output)`` except that a leading space of the first output token is kept. Like
vLLM, ``clean_up_tokenization_spaces`` is never applied.

For fast (Rust-backed) tokenizers the common step runs inside ``tokenizers.decoders.DecodeStream``
(as vLLM's ``FastIncrementalDetokenizer`` does), which applies the same prefix/read-offset rule
in one call. Wherever its rule and ours could part (it returned nothing, it raised, a byte-fallback
token), the step is decided by decoding the window here, and the stream is rebuilt from the
window once it is back in step, so the text is the same either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import tokenizers
import tokenizers.decoders

from parallm.sampling_params import SamplingParams

__all__ = ["IncrementalDetokenizer"]

_PROMPT_CONTEXT = 5  # prompt tokens decoded as context for the first output token
_MAX_CONTEXT_BACKOFF = 8  # extra prompt tokens tried to avoid starting inside a character
# Tokens held back at most (an unfinished character, a byte-fallback run); past this the text
# is released anyway so that a stream of invalid bytes cannot make every step decode more.
_MAX_PENDING = 32
_TRIM_AT = 64  # drop consumed ids from the window list once this many pile up

_REPLACEMENT = "\ufffd"

DecodeFn = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, emitting only complete UTF-8."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams):
        """Prepare to detokenize the output that follows ``prompt_token_ids``.

        ``tokenizer`` is a transformers tokenizer (fast or slow) or a ``tokenizers.Tokenizer``.
        """
        self._decoder = _OffsetDecoder(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._stops = tuple(params.stop)
        self._tail_len = max((len(s) for s in self._stops), default=1) - 1
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._sent: list[str] = []  # text already returned by take_delta
        self._unsent: list[str] = []  # decoded text not yet returned
        self._tail = ""  # last _tail_len chars of the text, where a stop may have begun
        self._finished = False
        self._stop_str: str | None = None

    @property
    def text(self) -> str:
        """The full output text so far (stop string removed once matched)."""
        return "".join(self._sent) + "".join(self._unsent)

    @property
    def finished(self) -> bool:
        """True after finish() or once a stop string matched."""
        return self._finished

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the output, if any."""
        return self._stop_str

    def add_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Append new output tokens; return the stop string that matched, else None.

        On a match the text is cut before the stop string (after it with
        ``include_stop_str_in_output``), the detokenizer is finished, and tokens after the one
        that completed the match are ignored. Like vLLM, stop strings are only looked for once
        there are ``min_tokens`` output tokens. Calls after finishing are ignored.
        """
        if self._finished:
            return None
        for token_id in token_ids:
            self._num_tokens += 1
            delta = self._decoder.step(token_id)
            if delta and self._append(delta):
                return self._stop_str
        return None

    def take_delta(self) -> str:
        """New text since the last call that is safe to stream.

        Never ends inside a character, and holds back a tail that could still become a stop
        string; once finished, releases everything.
        """
        pending = "".join(self._unsent)
        keep = 0 if self._finished or not self._stops else _stop_prefix_len(pending, self._stops)
        delta = pending[: len(pending) - keep] if keep else pending
        self._unsent = [pending[len(delta) :]] if keep else []
        if delta:
            self._sent.append(delta)
        return delta

    def finish(self) -> str | None:
        """Mark the output finished (e.g. length or EOS) so take_delta releases everything.

        Flushes bytes still held for an unfinished character. Returns the stop string if that
        flushed text completed one (the text is then cut as in add_tokens), else None.
        """
        if self._finished:
            return None
        rest = self._decoder.flush()
        self._finished = True
        if rest and self._append(rest):
            return self._stop_str
        return None

    def _append(self, delta: str) -> bool:
        """Add decoded text; on a stop match, truncate, finish and return True."""
        self._unsent.append(delta)
        if not self._stops:
            return False
        window = self._tail + delta
        searching = self._num_tokens >= self._min_tokens
        match = _earliest_stop(window, self._stops) if searching else None
        if match is None:
            self._tail = window[max(len(window) - self._tail_len, 0) :]
            return False
        start, stop = match
        end = start + len(stop) if self._include_stop else start
        self._drop_last(len(window) - end)
        self._stop_str = stop
        self._finished = True
        return True

    def _drop_last(self, n: int) -> None:
        # Never reaches into sent text: take_delta holds back every possible stop prefix.
        if n:
            pending = "".join(self._unsent)
            self._unsent = [pending[: len(pending) - n]]


def _earliest_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, stop) of the earliest-starting stop in ``text``; ties go to the shorter stop."""
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0 and (best is None or (i, len(stop)) < (best[0], len(best[1]))):
            best = (i, stop)
    return best


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class _OffsetDecoder:
    """Prefix/read-offset incremental decoding over a short window of token ids.

    ``ids[prefix:read]`` is context already emitted (``prefix_text`` is its decoding);
    ``ids[read:]`` are tokens whose text is pending. A step decodes ``ids[prefix:]`` and emits
    what lies beyond ``prefix_text`` unless that text is not final yet.

    ``stream``, when set, is a ``DecodeStream`` holding the same window and prefix text (its
    ``ids``, ``prefix`` and ``prefix_index`` are our ``ids[prefix:]``, ``prefix_text`` and
    ``read - prefix``). It emits exactly when we would, except that it also holds text that did
    not grow, holds without the _MAX_PENDING bound, emits byte-fallback tokens inside a run and
    raises when the new text does not extend the old; so its text is taken only when it emits
    for a token that is not a byte token, and every other step is decided here.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special: bool):
        backend = _backend(tokenizer)
        self._decode = _decode_fn(tokenizer, backend, skip_special)
        # Dropping tokens that decode() would skip anyway keeps the context window made of text.
        self._skip = _special_ids(tokenizer, backend) if skip_special else frozenset()
        self._is_byte = _byte_token_test(backend)
        context = [i for i in prompt_ids if i not in self._skip]
        start, prefix_text = _context(context, self._decode)
        self._prefix_text: str | None = prefix_text  # None: not decoded since the stream emitted
        self._ids = context[start:]
        self._prefix = 0
        self._read = len(self._ids)
        self._backend = backend if _DECODE_STREAM is not None else None
        self._skip_special = skip_special
        self._stream: Any = None  # a DecodeStream in our state, or None
        self._sync_stream(prefix_text)

    def step(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        stream = self._stream
        if stream is not None:
            if self._is_byte(token_id):
                self._stream = None  # a run may still turn invalid: decided here until it ends
            else:
                try:
                    delta = stream.step(self._backend, token_id)
                except Exception:  # text that does not extend the prefix: the window decides
                    self._stream = delta = None
                if delta is not None:
                    self._mark_read()
                    self._prefix_text = None
                    return delta
        return self._window_step(token_id)

    def flush(self) -> str:
        """Emit whatever is pending, even an incomplete character (as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids[self._prefix :]))

    def _window_step(self, token_id: int) -> str:
        """Decide a step by decoding the window (the stream, if still set, holds the same)."""
        text = self._decode(self._ids[self._prefix :])
        unsettled = text.endswith(_REPLACEMENT) or self._is_byte(token_id)
        if unsettled and len(self._ids) - self._read < _MAX_PENDING:
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._decode(self._ids[self._prefix : self._read])
        delta = text[len(prefix_text) :]
        self._mark_read()
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        self._sync_stream(self._prefix_text)
        return delta

    def _mark_read(self) -> None:
        """Pending tokens become context: the window starts where the last read ended."""
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def _sync_stream(self, prefix_text: str) -> None:
        """A stream in our state after an emission (window = prefix = read), or none.

        A ``DecodeStream`` built from ids takes their decoding as its prefix only if it does
        not end in U+FFFD; a prefix that does stays with the window decode here.
        """
        self._stream = None
        if self._backend is not None and not prefix_text.endswith(_REPLACEMENT):
            window = self._ids[self._prefix :]
            self._stream = _DECODE_STREAM(ids=window, skip_special_tokens=self._skip_special)


def _decode_stream_class() -> type | None:
    """tokenizers' ``DecodeStream`` if it can start after a context (``ids=``, tokenizers 0.22+,
    which also takes those ids' text as the prefix), else None: then every step decodes here."""
    cls = getattr(tokenizers.decoders, "DecodeStream", None)
    try:
        cls(ids=[], skip_special_tokens=False)
    except TypeError:  # missing (None is not callable) or without ids=
        return None
    return cls


_DECODE_STREAM = _decode_stream_class()


def _backend(tokenizer: Any) -> tokenizers.Tokenizer | None:
    """The Rust tokenizer behind ``tokenizer``, or None for a slow (Python) tokenizer."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, tokenizers.Tokenizer) else None


def _decode_fn(tokenizer: Any, backend: tokenizers.Tokenizer | None, skip: bool) -> DecodeFn:
    """A decode(ids) -> str that matches tokenizer.decode without cleanup spaces."""
    if backend is not None:
        # What transformers' fast decode calls, minus several microseconds of Python per call.
        return functools.partial(backend.decode, skip_special_tokens=skip)
    return functools.partial(
        tokenizer.decode, skip_special_tokens=skip, clean_up_tokenization_spaces=False
    )


def _special_ids(tokenizer: Any, backend: tokenizers.Tokenizer | None) -> frozenset[int]:
    """Ids that decode(..., skip_special_tokens=True) leaves out."""
    if backend is not None:
        added = backend.get_added_tokens_decoder()
        return frozenset(i for i, tok in added.items() if tok.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))


def _byte_token_test(backend: tokenizers.Tokenizer | None) -> Callable[[int], bool]:
    """Whether an id is a ``<0xNN>`` token that a ByteFallback decoder merges with its neighbours.

    ByteFallback decodes a whole run of byte tokens at once and turns every byte of an invalid
    run into U+FFFD, valid characters included, so a run's text is only final once it ends.
    """
    decoder = backend.decoder if backend is not None else None
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return lambda token_id: False

    def is_byte(token_id: int) -> bool:
        token = backend.id_to_token(token_id)
        return token is not None and len(token) == 6 and token.startswith("<0x")

    return is_byte


def _context(ids: list[int], decode: DecodeFn) -> tuple[int, str]:
    """Start and text of the prompt context: about _PROMPT_CONTEXT tokens, on a char boundary.

    A window that starts inside a multi-byte character decodes to a leading U+FFFD, and with
    byte-fallback decoders that spoils the bytes after it as well, so step back a little.
    """
    start = max(len(ids) - _PROMPT_CONTEXT, 0)
    first = decode(ids[start:])
    for i in range(start, max(start - _MAX_CONTEXT_BACKOFF, 0) - 1, -1):
        text = first if i == start else decode(ids[i:])
        if not text.startswith(_REPLACEMENT):
            return i, text
    return start, first


def decode_in_context(
    tokenizer: Any, prompt_ids: Sequence[int], output_ids: Sequence[int], skip_special_tokens: bool
) -> str:
    """One-shot decode of a finished output, giving the same text as the incremental path.

    Decoding after a few prompt tokens keeps the first output token's leading space the way
    the incremental detokenizer (and a full decode of prompt + output) has it.
    """
    context = list(prompt_ids[-_PROMPT_CONTEXT:])
    prefix = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(context + list(output_ids), skip_special_tokens=skip_special_tokens)
    if full.startswith(prefix) and not prefix.endswith(_REPLACEMENT):
        return full[len(prefix) :]
    return tokenizer.decode(list(output_ids), skip_special_tokens=skip_special_tokens)
