"""Drafts from earlier requests: a ring of finished requests' tokens that prompt lookup falls
back to where a sequence's own tokens give nothing (``prompt_lookup_history_tokens``).

Why: about a third of prompt lookup's steps draft nothing even at n = 1, and in device mode
each still costs a whole verify step. Requests to one server repeat each other (the same
code base, the same boilerplate), so the newest earlier occurrence of a sequence's last
tokens often predicts its next ones (suffix decoding, Oliaro et al., 2024;
benchmarks/ngram_acceptance.py's ``history`` variant).

The ring: each finished sequence's prompt and output followed by ``SEPARATOR`` (no vocabulary
holds -1), written whole at ``fill``. A sequence that does not fit the space left starts over
at the ring's ``start`` (position 0 without a base, below): the ring has wrapped, and ``[fill,
used)`` holds the previous lap's (older) sequences, ``[start, fill)`` the newer ones. What a
write cuts of an older sequence is overwritten with separators, so a draft never reads half a
sequence; and since every sequence ends with a separator and the searched tokens are never -1,
no match or draft crosses from one sequence into another. Newest first in write order:
``[start, fill)`` from its end, then ``[fill, used)`` from its end.

A datastore (``prompt_lookup_datastore``, spec/datastore.py) is a fixed ``base`` laid before
the ring: its documents, each ended by a separator, at ``[0, start)``, never overwritten; the
ring proper is ``[start, start + capacity)`` and a wrap starts over at ``start``. The base is
older than every sequence the ring holds: it is searched last (retrieval-based drafting, REST,
He et al., 2024). Without a base ``start`` is 0.

The host drafter searches the ring's bytes (``bytearray.rfind``, in C) and the base through its
suffix index (spec/suffix_index.py: a datastore of millions of tokens would cost milliseconds a
scan); the device drafter's tail scans a copy of both on the device (``to_device``;
kernels/history_lookup.py), updated in place by ``add`` and ``clear`` so that a captured graph
keeps reading it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from parallm.engine.spec.ngram import WORD_BYTES, rfind_tokens
from parallm.engine.spec.suffix_index import BaseIndex, SuffixIndex

SEPARATOR = -1
_SEPARATOR_WORD = np.int32(SEPARATOR).tobytes()
# Across requests a single shared token says little: the ring's matches are 2 to 8 tokens
# long (the offline study's best), widened by the configured lookup range.
HISTORY_MIN_N, HISTORY_MAX_N = 2, 8


def history_ngram_range(min_n: int, max_n: int) -> tuple[int, int]:
    """The n-gram sizes searched in the ring for a lookup configured with ``min_n..max_n``."""
    return max(HISTORY_MIN_N, min_n), max(HISTORY_MAX_N, max_n)


class TokenHistory:
    """A ring of ``capacity`` int32 tokens holding finished sequences, newest last, after an
    optional fixed ``base`` of tokens (a datastore, separators between its documents)."""

    def __init__(
        self, capacity: int, base: np.ndarray | None = None, index_depth: int = HISTORY_MAX_N
    ) -> None:
        has_base = base is not None and len(base) > 0
        if capacity < 2 and not (capacity == 0 and has_base):
            raise ValueError(
                f"TokenHistory: capacity must be at least 2 tokens (or 0 with a base), got "
                f"{capacity}"
            )
        self.capacity = capacity
        self.start = len(base) + 1 if has_base else 0  # the ring proper: [start, size)
        size = self.start + capacity
        # One buffer seen three ways: bytes to search, numpy to write, torch to copy.
        self._words = bytearray(size * WORD_BYTES)
        self._tokens = np.frombuffer(self._words, dtype=np.int32)
        self.ring = torch.frombuffer(self._words, dtype=torch.int32)
        self._tokens[:] = SEPARATOR
        # The base's own lookups go through its suffix index (searched by n up to
        # ``index_depth``, beyond that scanned; 0: no index, every lookup scans); the ring's
        # are byte searches.
        self._index: SuffixIndex | None = None
        if has_base:
            self._tokens[: self.start - 1] = base
            if index_depth > 0:
                base_tokens = self._tokens[: self.start - 1]
                self._index = SuffixIndex(base_tokens, index_depth, SEPARATOR)
        self.fill = self.start  # where the next sequence is written
        # [0, used) holds tokens: [fill, used) the older lap's sequences when wrapped
        self.used = self.start
        self.device_ring: torch.Tensor | None = None
        self.device_state: torch.Tensor | None = None  # [fill, used, start], int32
        # The base's index on the device: the GPU searches the base instead of scanning it.
        self.device_index: BaseIndex | None = None

    @property
    def index(self) -> SuffixIndex | None:
        """The base's suffix index (None without a base, or built with ``index_depth`` 0)."""
        return self._index

    @property
    def wrapped(self) -> bool:
        """Whether the ring holds an older lap's sequences after ``fill``."""
        return self.used > self.fill

    def add(self, tokens: Sequence[int]) -> None:
        """Append one finished sequence (its last ``capacity - 1`` tokens if longer); nothing
        when the ring has no room of its own (a base alone)."""
        if self.capacity == 0:
            return
        tokens = np.asarray(tokens, dtype=np.int32)[-(self.capacity - 1) :]
        size = len(tokens) + 1
        wraps = self.fill + size > len(self._tokens)
        start = self.start if wraps else self.fill
        if wraps:
            self.used = self.fill  # what lies past the lap just ended is older still: dropped
        end = start + size
        cut = self._cut_end(end)  # read before the write overwrites the old boundary
        self._tokens[start : end - 1] = tokens
        self._tokens[end - 1 : cut] = SEPARATOR  # and the rest of an older sequence it cut
        self.fill, self.used = end, max(self.used, end)
        self._sync(start, cut)

    def clear(self) -> None:
        """Forget every sequence (the base stays)."""
        self._tokens[self.start :] = SEPARATOR
        self.fill = self.used = self.start
        if self.device_ring is not None:
            self.device_ring[self.start :].fill_(SEPARATOR)
            self.device_state.fill_(self.start)

    def lookup(self, context: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
        """Up to ``k`` tokens that followed the newest occurrence of the context's last n
        tokens, for the longest n in ``[min_n, max_n]`` that occurs followed by at least one
        token of its sequence; the draft stops before the sequence's separator."""
        if k < 1 or not self.used:
            return []
        # An occurrence of a longer suffix ends with one of every shorter suffix, followed
        # alike: the n that occur run from min_n up to the longest, so the search goes up and
        # stops at the first n that does not occur (the only search that reads the whole ring).
        newest = -1
        base = self._index.walk(context) if self._index is not None else None
        for n in range(min_n, min(max_n, len(context)) + 1):
            end = self._newest(context, n, self.start if base is None else 0)
            if end < 0 and base is not None:  # only then the base, oldest
                end = base.end(n) if n <= base.index.depth else self._newest(context, n)
            if end < 0:
                break
            newest = end
        return self._draft(newest + 1, k) if newest >= 0 else []

    def device_bytes(self) -> int:
        """What ``to_device`` will allocate: the ring (its base too) and the base's index."""
        index = 0 if self._index is None else self._index.device_bytes()
        return len(self.ring) * WORD_BYTES + index

    def to_device(self, device: torch.device | str) -> None:
        """Keep a copy of the ring and ``[fill, used, start]`` on ``device`` (``device_ring``,
        ``device_state``), updated in place from now on: a captured graph may read them."""
        device = torch.device(device)
        if self.device_ring is not None:
            if self.device_ring.device != device:
                raise ValueError(f"TokenHistory: already on {self.device_ring.device}")
            return
        self.device_ring = self.ring.to(device, copy=True)
        self.device_state = torch.tensor(self._state(), dtype=torch.int32, device=device)
        if self._index is not None:
            self.device_index = self._index.to_device(device)

    def _newest(self, context: Sequence[int], n: int, base: int | None = None) -> int:
        """The end position of the newest occurrence of the context's last ``n`` tokens that a
        token of its own sequence follows, or -1; in the base's first ``base`` tokens only
        (default: all of them)."""
        pattern = np.asarray(context[len(context) - n :], dtype=np.int32).tobytes()
        # Newest first: this lap, the older lap, the base.
        base = self.start if base is None else base
        for lo, hi in ((self.start, self.fill), (self.fill, self.used), (0, base)):
            end = hi * WORD_BYTES
            while (at := rfind_tokens(self._words, pattern, lo * WORD_BYTES, end)) >= 0:
                last = (at + len(pattern)) // WORD_BYTES - 1
                if last + 1 < hi and self._tokens[last + 1] != SEPARATOR:
                    return last
                end = at + len(pattern) - 1  # the next search: occurrences before this one
        return -1

    def _draft(self, start: int, k: int) -> list[int]:
        after = self._tokens[start : start + k].tolist()
        return after[: after.index(SEPARATOR)] if SEPARATOR in after else after

    def _cut_end(self, end: int) -> int:
        """Where the older sequence that a write of ``[.., end)`` cuts ends (one past the
        write's last position, ``end``, when it cuts none): past the first separator at or
        after ``end - 1``. Call before the write."""
        if end >= self.used:  # everything older up to ``used`` is overwritten
            return end
        # A byte search (``used - 1`` holds a separator, so there is one): a scan of the
        # rest of the ring on every add would cost a millisecond at 1M tokens.
        at = self._words.find(_SEPARATOR_WORD, (end - 1) * WORD_BYTES, self.used * WORD_BYTES)
        while at >= 0 and at % WORD_BYTES:
            at = self._words.find(_SEPARATOR_WORD, at + 1, self.used * WORD_BYTES)
        return at // WORD_BYTES + 1

    def _state(self) -> list[int]:
        return [self.fill, self.used, self.start]

    def _sync(self, start: int, end: int) -> None:
        """Copy ring positions ``[start, end)`` and the state to the device copy, behind the
        work queued there (a pinned source on CUDA: the host goes on at once)."""
        if self.device_ring is None:
            return
        cuda = self.device_ring.device.type == "cuda"
        chunk = self.ring[start:end].clone()
        state = torch.tensor(self._state(), dtype=torch.int32)
        if cuda:
            chunk, state = chunk.pin_memory(), state.pin_memory()
        self.device_ring[start:end].copy_(chunk, non_blocking=cuda)
        self.device_state.copy_(state, non_blocking=cuda)
