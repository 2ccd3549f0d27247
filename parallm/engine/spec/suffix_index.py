"""The newest occurrence of a context's last n tokens in a fixed token array, without scanning
the array: a suffix array of the array read backwards (a datastore's host lookups,
spec/history.py).

Read backwards, the context's last n tokens are the first n tokens of a suffix, and its last
n + 1 tokens extend them: their suffix-array range lies inside the n tokens' range, so each
longer n is one binary search on one more token, inside the last range. An occurrence ending
at position ``e`` is the backward suffix starting at ``r = N - 1 - e``: the newest occurrence
(the highest ``e``) that a token follows is the smallest such ``r`` in the range, a range
minimum over the positions of the suffixes that have a token after their occurrence (a
separator or the array's end is none). The minimum is taken over blocks of ``_BLOCK`` entries
and a sparse table of the blocks' minima.

The suffixes are sorted by their first ``depth`` tokens only (prefix doubling: one argsort a
doubling), so ``end`` answers for n up to ``depth``. Memory: two int32 arrays of the tokens'
length; building them takes about eight times that for a moment, and one argsort of the
tokens a doubling.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

_BLOCK = 256
_NONE = np.iinfo(np.int32).max  # a suffix with no token after its occurrence
_PAST_END = -2  # below every token and the separator (-1): a suffix that ends sorts first
_PROGRESS_TOKENS = 1 << 23  # a progress bar from here on (about 5 s to build)


class BaseIndex(NamedTuple):
    """A ``SuffixIndex``'s arrays on a device (``SuffixIndex.to_device``), which
    kernels/suffix_search.py searches."""

    order: torch.Tensor  # int32 [N]: backward starts, sorted
    values: torch.Tensor  # int32 [N]: ``order``, or _NONE where no token follows
    tables: torch.Tensor  # int32: the sparse table's levels one after another (at least one)
    offsets: torch.Tensor  # int32 [levels]: where each level starts in ``tables``
    depth: int  # the index sorts this many tokens: the longest n it answers
    block: int  # the entries of a block minimum (_BLOCK)


class SuffixIndex:
    """``tokens`` (int32; -1 separates documents), sorted to ``depth`` tokens."""

    def __init__(self, tokens: np.ndarray, depth: int, separator: int) -> None:
        if depth < 1:
            raise ValueError(f"SuffixIndex: depth must be at least 1, got {depth}")
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.depth = depth
        size = len(self.tokens)
        backward = self.tokens[::-1]
        self.order = _suffix_order(backward, depth)  # backward starts, sorted
        # Followed by a token: the backward suffix starting at r has one before it (r >= 1)
        # that is not a separator.
        before = np.concatenate([[separator], backward[:-1]]).astype(np.int32)
        followed = before[self.order] != separator
        self.values = np.where(followed, self.order, _NONE).astype(np.int32)
        self._tables = _block_tables(self.values)
        self._size = size

    def to_device(self, device: torch.device | str) -> BaseIndex:
        """The arrays that a search on ``device`` reads (the tokens themselves are the ring's
        device copy)."""
        order, values, tables, offsets = (torch.from_numpy(a).to(device)
                                          for a in self._device_arrays())  # fmt: skip
        return BaseIndex(order, values, tables, offsets, self.depth, _BLOCK)

    def device_bytes(self) -> int:
        """What ``to_device`` allocates (``_device_arrays``' sizes, counted without building
        them: the flattened table is tens of MB at 100M tokens)."""
        table_rows = sum(len(t) for t in self._tables) + 1
        offsets = len(self._tables)
        return self.order.nbytes + self.values.nbytes + (table_rows + offsets) * 4

    def _device_arrays(self) -> tuple[np.ndarray, ...]:
        """``BaseIndex``'s arrays on the host: the sparse table's levels flattened."""
        offsets = np.cumsum([0] + [len(t) for t in self._tables[:-1]]).astype(np.int32)
        tables = np.concatenate([*self._tables, [_NONE]]).astype(np.int32)  # never empty
        return self.order, self.values, tables, offsets

    def walk(self, context: Sequence[int]) -> IndexWalk:
        """The newest occurrence of ``context``'s last n tokens, n going up (``IndexWalk``)."""
        return IndexWalk(self, context)

    def token(self, entry: int, offset: int) -> int:
        """Token ``offset`` of the backward suffix at sorted ``entry`` (``_PAST_END`` beyond)."""
        start = int(self.order[entry]) + offset
        return int(self.tokens[self._size - 1 - start]) if start < self._size else _PAST_END

    def newest_end(self, lo: int, hi: int) -> int:
        """The highest end position among sorted entries ``[lo, hi)`` that a token follows,
        or -1."""
        smallest = _range_min(self.values, self._tables, lo, hi)
        return -1 if smallest == _NONE else self._size - 1 - smallest


class IndexWalk:
    """``end(n)`` for n = 1, 2, ... in turn: each narrows the last n's range by one token."""

    def __init__(self, index: SuffixIndex, context: Sequence[int]) -> None:
        self.index, self.context = index, context
        self.n, self.lo, self.hi = 0, 0, len(index.order)

    def end(self, n: int) -> int:
        """The end of the newest occurrence of the context's last ``n`` tokens that a token
        follows, or -1 (also for n past the context or past the index's depth)."""
        if n < self.n or n > len(self.context) or n > self.index.depth:
            raise ValueError(f"IndexWalk: n must go up from {self.n} to at most "
                             f"{min(len(self.context), self.index.depth)}, got {n}")  # fmt: skip
        index = self.index
        while self.n < n and self.lo < self.hi:
            want = int(self.context[len(self.context) - 1 - self.n])
            span = range(self.lo, self.hi)
            key = lambda entry, j=self.n: index.token(entry, j)  # noqa: E731
            self.lo, self.hi = (
                self.lo + bisect.bisect_left(span, want, key=key),
                self.lo + bisect.bisect_right(span, want, key=key),
            )
            self.n += 1
        return index.newest_end(self.lo, self.hi) if self.lo < self.hi else -1


def _suffix_order(tokens: np.ndarray, depth: int) -> np.ndarray:
    """Suffix starts of ``tokens`` sorted by their first ``depth`` tokens (a suffix that ends
    sorts before any that goes on), by prefix doubling. torch's sorts, not numpy's: they run
    on every core (3x numpy's stable argsort on two cores, 16.8M keys)."""
    size = len(tokens)
    rank = torch.from_numpy(tokens.astype(np.int64) - _PAST_END + 1)  # >= 1: 0 is past the end
    width = 1  # ``rank`` orders the suffixes by their first ``width`` tokens
    rounds = max(0, (depth - 1).bit_length())
    bar = tqdm(total=rounds, desc=f"Indexing a datastore of {size:,} tokens", unit="doubling",
               disable=size < _PROGRESS_TOKENS)  # fmt: skip
    while width < depth:
        following = torch.zeros(size, dtype=torch.int64)
        following[: size - width] = rank[width:]
        key = rank * (int(rank.max()) + 1) + following
        ordered, order = torch.sort(key, stable=True)
        starts = torch.ones(size, dtype=torch.int64)  # 1 where a new key begins
        starts[1:] = ordered[1:] != ordered[:-1]
        rank = torch.empty_like(rank)
        rank[order] = torch.cumsum(starts, 0)
        width *= 2
        bar.update()
    bar.close()
    if width == 1:  # depth 1: no doubling sorted them
        order = torch.sort(rank, stable=True).indices
    return order.to(torch.int32).numpy()


def _block_tables(values: np.ndarray) -> list[np.ndarray]:
    """A sparse table over the minima of ``_BLOCK``-entry blocks: level j holds the minimum of
    2^j blocks from each block on."""
    blocks = len(values) // _BLOCK
    level = values[: blocks * _BLOCK].reshape(blocks, _BLOCK).min(axis=1)
    tables = [level]
    span = 1
    while 2 * span <= blocks:
        level = np.minimum(level[:-span], level[span:])
        tables.append(level)
        span *= 2
    return tables


def _range_min(values: np.ndarray, tables: list[np.ndarray], lo: int, hi: int) -> int:
    first, last = -(-lo // _BLOCK), hi // _BLOCK  # the whole blocks inside [lo, hi)
    if first >= last:
        return int(values[lo:hi].min())
    best = _NONE
    if lo < first * _BLOCK:
        best = min(best, int(values[lo : first * _BLOCK].min()))
    if last * _BLOCK < hi:
        best = min(best, int(values[last * _BLOCK : hi].min()))
    level = (last - first).bit_length() - 1
    table = tables[level]
    return min(best, int(table[first]), int(table[last - (1 << level)]))
