"""A datastore's drafts on the GPU by search, not scan: the device side of ``SuffixIndex``
(spec/suffix_index.py), for ``history_lookup``'s rows whose own prompt lookup found nothing.

Scanning a base of 103M tokens costs 614 µs a step at batch 1 on an H200, more than the 150M
code model's plain step (RESULTS, eighteenth session). The suffix index sorts the base's end
positions by the tokens read backwards from them, so the occurrences of a row's last n tokens
are one contiguous range, and each longer n narrows the last range by the next token back.

One program a row. For n = 1 .. MAX_N it finds the range's two bounds by a K-ary search (K
probes a round in parallel, so a round costs two dependent loads and a 103M-token base needs
three rounds and a last step: a binary search would chain 27), then the newest end in the
range that a token follows, by the index's block minima and sparse table (``values`` holds the
backward start, the smallest the newest; ``_NONE`` where a separator or the base's end
follows). Each n's newest end goes into ``newest[row, n]`` by an atomic max, the key that the
ring's scan gives a base position, so the gather picks the same draft either way.
"""

from __future__ import annotations

import triton
import triton.language as tl

from parallm.engine.spec import suffix_index
from parallm.engine.spec.suffix_index import BaseIndex

_PROBES = 128  # K: a round's probes (a 103M-token range needs three rounds)
# The index's token past the base's start (below every token), and its "no token follows".
_PAST_END = tl.constexpr(suffix_index._PAST_END)
_NONE = tl.constexpr(int(suffix_index._NONE))


def search_rounds(size: int, probes: int = _PROBES) -> int:
    """K-ary rounds that take a range of ``size`` entries down to at most ``probes``."""
    rounds = 0
    while size > probes:
        size = size // (probes + 1) + 1
        rounds += 1
    return rounds


@triton.jit
def _token_at(order_ptr, ring_ptr, size, entry, offset, mask):
    """Token ``offset`` of the backward suffix at sorted ``entry`` (``_PAST_END`` beyond the
    base's first token)."""
    start = tl.load(order_ptr + entry, mask=mask, other=0) + offset
    inside = mask & (start < size)
    return tl.load(ring_ptr + (size - 1 - start), mask=inside, other=_PAST_END)


@triton.jit
def _lower_bound(order_ptr, ring_ptr, size, lo, hi, offset, want, K: tl.constexpr,
                 ROUNDS: tl.constexpr):  # fmt: skip
    """The first entry in ``[lo, hi)`` whose token at ``offset`` is at least ``want`` (``hi``
    if none). The entries share their first ``offset`` tokens, so these tokens ascend."""
    j = tl.arange(0, K)
    a, b = lo, hi
    for _ in tl.static_range(ROUNDS):
        width = b - a
        # Else the round changes nothing: the last step takes it. (Compared as a vector: the
        # interpreter takes no scalar in a mask.)
        wide = (j * 0 + width) > K
        probe = (a + ((j + 1).to(tl.int64) * width) // (K + 1)).to(tl.int32)
        below = wide & (_token_at(order_ptr, ring_ptr, size, probe, offset, wide) < want)
        # The probes below ``want`` are a prefix: the answer lies after the last of them and
        # at or before the first probe that is not.
        a_next = tl.max(tl.where(below, probe + 1, a), axis=0)
        b_next = tl.min(tl.where(wide & ~below, probe, b), axis=0)
        a, b = tl.where(width > K, a_next, a), tl.where(width > K, b_next, b)
    entry = a + j
    inside = entry < b
    below = inside & (_token_at(order_ptr, ring_ptr, size, entry, offset, inside) < want)
    return a + tl.sum(below.to(tl.int32), axis=0)


@triton.jit
def _newest_followed(values_ptr, tables_ptr, offsets_ptr, lo, hi, size, B: tl.constexpr):
    """The highest end position among sorted entries ``[lo, hi)`` that a token follows, or -1:
    the partial blocks at both ends read whole, the blocks between from the sparse table."""
    first = (lo + B - 1) // B
    last = hi // B
    k = tl.arange(0, B)
    left = lo + k
    right = tl.maximum(lo, last * B) + k
    smallest = tl.minimum(
        tl.min(tl.load(values_ptr + left, mask=left < tl.minimum(hi, first * B), other=_NONE)),
        tl.min(tl.load(values_ptr + right, mask=right < hi, other=_NONE)),
    )
    blocks = last - first
    level = tl.zeros_like(blocks)  # floor(log2(blocks)) for blocks >= 1
    for bit in tl.static_range(1, 31):
        level += (blocks >= (1 << bit)).to(tl.int32)
    span = (blocks * 0 + 1) << level
    two = tl.arange(0, 2)  # the two overlapping runs of 2**level blocks
    at = tl.load(offsets_ptr + level) + tl.where(two == 0, first, last - span)
    table = tl.load(tables_ptr + at, mask=(two * 0 + blocks) > 0, other=_NONE)
    smallest = tl.minimum(smallest, tl.min(table, axis=0))
    return tl.where((lo < hi) & (smallest != _NONE), size - 1 - smallest, -1)


@triton.jit(do_not_specialize=["stride_row", "size"])
def _base_search_kernel(tokens_ptr, lengths_ptr, counts_ptr, ring_ptr, order_ptr, values_ptr,
                        tables_ptr, offsets_ptr, newest_ptr, stride_row, size,
                        MAX_N: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
                        ROUNDS: tl.constexpr, B: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    if tl.load(counts_ptr + row) == 0:  # a row with drafts of its own searches nothing
        length = tl.load(lengths_ptr + row)
        base = tokens_ptr + row.to(tl.int64) * stride_row
        n = tl.arange(0, BLOCK_N)
        ends = tl.full([BLOCK_N], -1, tl.int32)
        lo = tl.zeros([], tl.int32)
        hi = lo + size
        for offset in tl.static_range(MAX_N):  # the last offset + 1 tokens
            want = tl.load(base + tl.maximum(length - 1 - offset, 0))
            lower = _lower_bound(order_ptr, ring_ptr, size, lo, hi, offset, want, K, ROUNDS)
            upper = _lower_bound(order_ptr, ring_ptr, size, lo, hi, offset, want + 1, K, ROUNDS)
            lo, hi = lower, tl.where(offset < length, upper, lower)
            end = _newest_followed(values_ptr, tables_ptr, offsets_ptr, lo, hi, size, B)
            ends = tl.where(n == offset + 1, end, ends)
        tl.atomic_max(newest_ptr + row * BLOCK_N + n, ends, mask=ends >= 0, sem="relaxed")


def search_base(tokens, lengths, counts, ring, index: BaseIndex, size: int, newest,
                max_n: int) -> None:  # fmt: skip
    """Each row with ``counts`` 0: the newest end in the base (``ring[:size]``) of its last n
    tokens, n = 1 .. ``max_n``, into ``newest[row, n]`` (an atomic max; ``history_lookup``'s
    scratch, which its gather reads and resets)."""
    if max_n > index.depth:
        raise ValueError(f"search_base: the index answers n up to {index.depth}, not {max_n}")
    _base_search_kernel[(tokens.shape[0],)](
        tokens, lengths, counts, ring, index.order, index.values, index.tables, index.offsets,
        newest, tokens.stride(0), size, MAX_N=max_n, BLOCK_N=newest.shape[1], K=_PROBES,
        ROUNDS=search_rounds(size), B=index.block,
    )  # fmt: skip
