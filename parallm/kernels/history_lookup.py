"""Drafts from earlier requests on the GPU: the device twin of ``TokenHistory.lookup``
(spec/history.py) and of ``history_lookup_ref``, for the rows whose own prompt lookup found
nothing.

For each such row, the longest n in ``[min_n, max_n]`` whose last-n-token suffix occurs in the
ring followed by a token of its own sequence wins; among its occurrences the newest in write
order (``[fill, used)`` holds the older lap's sequences, ``[start, fill)`` the newer ones, and a
datastore's fixed base ``[0, start)`` is older than both); the
drafts are up to ``num_tokens`` tokens after it, stopping before a separator. The ring, its
``[fill, used]`` state and every buffer stay on the device and keep their shapes, so the device
drafter's captured tail runs it after ``prompt_lookup``.

Two kernels, as ``prompt_lookup``'s. The first gives every (chunk of ring positions, row) a
program, the chunks on the grid's x axis (a datastore's ring can have millions; y holds at most
65,535): for each end position ``e`` it counts how many tokens ending at ``e`` match the row's
last tokens (up to ``max_n``), and for each n the newest ``e`` that matches n tokens goes into
``newest[row, n]`` by an atomic max over its age key (``e + capacity`` in the newer lap, ``e``
in the older one and the base). A row with drafts of its own scans nothing: its programs
return after loading its count. The second picks
each such row's longest n that matched, gathers the drafts after it and resets ``newest`` for
the next call (the buffer lives in a captured graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parallm.engine.spec.suffix_index import BaseIndex
from parallm.kernels.prompt_lookup import _NO_MATCH, lookup_buffer, pick_longest, publish_latest
from parallm.kernels.suffix_search import search_base

_BLOCK = 512  # ring positions a program scans
# "No match yet" in ``newest``, below every age key: prompt lookup's sentinel, so that both
# kernels' scratch is a ``lookup_buffer``.
_NONE = tl.constexpr(_NO_MATCH)
_SEP = tl.constexpr(-1)  # spec/history.py's SEPARATOR


@triton.jit(do_not_specialize=["stride_row", "capacity", "first"])
def _ring_match_kernel(tokens_ptr, lengths_ptr, counts_ptr, ring_ptr, state_ptr, newest_ptr,
                       stride_row, capacity, first, MAX_N: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(1)  # rows on the grid's y axis (at most 65,535), chunks on x
    # A row with drafts of its own scans nothing: its programs end here, before any ring load
    # (at batch 1 with a datastore of 103M tokens, masking the loads instead left 609 µs).
    if tl.load(counts_ptr + row) == 0:
        size = tl.load(lengths_ptr + row)
        fill = tl.load(state_ptr)
        used = tl.load(state_ptr + 1)
        start = tl.load(state_ptr + 2)
        ends = first + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        base = tokens_ptr + row.to(tl.int64) * stride_row
        live, matched, key = match_ring(base, size, ring_ptr, ends, used - 1, fill, start,
                                        capacity, MAX_N)  # fmt: skip
        publish_latest(newest_ptr, row, matched, live, key, MAX_N, BLOCK_N)


@triton.jit
def match_ring(base, size, ring_ptr, ends, limit, fill, start, capacity, MAX_N: tl.constexpr):
    """For ring end positions ``ends``: whether each can end a match (below ``limit`` and
    followed by a token, not a separator), how many of the row's last tokens (``base``,
    ``size`` of them) end there, up to ``MAX_N``, and its age key (``_ring_match_kernel``)."""
    live = ends < limit
    follow = tl.load(ring_ptr + ends + 1, mask=live, other=-1)
    live = live & (follow != _SEP)
    matched = tl.zeros_like(ends)
    still = live
    for i in tl.static_range(MAX_N):
        # Past the row's first token ``want`` repeats it: such n exceed the row's length, and
        # the gather takes no n longer than the row.
        want = tl.load(base + tl.maximum(size - 1 - i, 0))
        got = tl.load(ring_ptr + ends - i, mask=still & (ends >= i), other=-2)
        still = still & (ends >= i) & (got == want)
        matched += still.to(tl.int32)
    # The newer lap ages above the older, which ages above the base.
    key = tl.where((ends < fill) & (ends >= start), ends + capacity, ends)
    return live, matched, key


@triton.jit(do_not_specialize=["stride_drafts", "capacity"])
def _ring_gather_kernel(lengths_ptr, counts_ptr, ring_ptr, newest_ptr, drafts_ptr, stride_drafts,
                        capacity, min_n, max_n, num_tokens, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    size = tl.load(lengths_ptr + row)
    own = tl.load(counts_ptr + row)
    n = tl.arange(0, BLOCK_N)
    keys = tl.load(newest_ptr + row * BLOCK_N + n)
    best, key = pick_longest(keys, n, min_n, max_n, size)
    start = tl.where(key >= capacity, key - capacity, key) + 1
    # Only rows without drafts of their own that matched take any (vector bounds, no scalar
    # masks: the interpreter needs them).
    room = tl.where((own == 0) & (best > 0), tl.minimum(num_tokens, capacity - start), 0)
    j = tl.arange(0, BLOCK_K)
    got = tl.load(ring_ptr + start + j, mask=j < room, other=-1)
    count = tl.min(tl.where((got == _SEP) | (j >= room), j, BLOCK_K), axis=0)
    drafts = tl.where(j < count, got, 0)
    tl.store(
        drafts_ptr + row * stride_drafts + j, drafts, mask=j < tl.where(own == 0, num_tokens, 0)
    )
    tl.store(counts_ptr + row, tl.where(own == 0, count, own))
    tl.store(newest_ptr + row * BLOCK_N + n, tl.full([BLOCK_N], _NONE, tl.int32))


def history_lookup(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    ring: torch.Tensor,
    state: torch.Tensor,
    drafts: torch.Tensor,
    counts: torch.Tensor,
    num_tokens: int,
    min_n: int,
    max_n: int,
    *,
    newest: torch.Tensor | None = None,
    index: BaseIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the rows of ``drafts``/``counts`` (``prompt_lookup``'s output, in place) whose
    count is 0 with drafts from the ring; returns them. Other rows are left as they are.

    tokens: ``[B, L]`` int32, rows contiguous; lengths: ``[B]`` int32; ring: ``[H]`` int32
    (``TokenHistory.device_ring``); state: ``[3]`` int32, ``[fill, used, start]``
    (``TokenHistory.device_state``); drafts: ``[B, num_tokens]`` int32; counts: ``[B]`` int32.
    ``newest`` (``lookup_buffer(B, max_n)``) may be given, as a captured graph does. With
    ``index`` (the base's ``SuffixIndex.to_device``) the base is searched
    (kernels/suffix_search.py) and only the ring after it scanned; without, all is scanned.
    """
    _check(tokens, lengths, ring, state, drafts, counts, num_tokens, min_n, max_n)
    rows, capacity = tokens.shape[0], ring.shape[0]
    if newest is None:
        newest = lookup_buffer(rows, max_n, tokens.device)
    block_n = triton.next_power_of_2(max_n + 1)
    if newest.shape != (rows, block_n) or newest.dtype != torch.int32:
        raise ValueError(f"history_lookup: newest must be lookup_buffer({rows}, {max_n})")
    if rows == 0:
        return drafts, counts
    first = 0  # where the scan starts: past the base and its separator when that is searched
    if index is not None:
        first = len(index.order) + 1
        search_base(tokens, lengths, counts, ring, index, first - 1, newest, max_n)
    # A ring of more than 65,535 chunks (33.5M tokens, a datastore) needs them on x.
    if capacity > first:
        _ring_match_kernel[(triton.cdiv(capacity - first, _BLOCK), rows)](
            tokens, lengths, counts, ring, state, newest, tokens.stride(0), capacity, first,
            MAX_N=max_n, BLOCK_N=block_n, BLOCK=_BLOCK,
        )  # fmt: skip
    gather_ring_drafts(lengths, counts, ring, newest, drafts, num_tokens, min_n, max_n)
    return drafts, counts


def gather_ring_drafts(lengths, counts, ring, newest, drafts, num_tokens, min_n, max_n) -> None:
    """The second kernel of ``history_lookup``: each row's drafts from ``newest``'s matches
    (the first kernel's), ``newest`` reset."""
    _ring_gather_kernel[(lengths.shape[0],)](
        lengths, counts, ring, newest, drafts, drafts.stride(0), ring.shape[0], min_n, max_n,
        num_tokens, BLOCK_N=newest.shape[1], BLOCK_K=triton.next_power_of_2(num_tokens),
    )  # fmt: skip


def _check(tokens, lengths, ring, state, drafts, counts, num_tokens, min_n, max_n) -> None:
    if num_tokens < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"history_lookup: need num_tokens >= 1 and 1 <= min_n <= max_n, got "
                         f"num_tokens={num_tokens}, min_n={min_n}, max_n={max_n}")  # fmt: skip
    if tokens.dim() != 2 or tokens.dtype != torch.int32 or tokens.stride(1) != 1:
        raise ValueError("history_lookup: tokens must be int32 [B, L] with contiguous rows")
    rows = tokens.shape[0]
    for name, t, shape in (("lengths", lengths, (rows,)), ("counts", counts, (rows,)),
                           ("state", state, (3,))):  # fmt: skip
        if t.shape != shape or t.dtype != torch.int32:
            raise ValueError(f"history_lookup: {name} must be int32 {list(shape)}")
    if ring.dim() != 1 or ring.dtype != torch.int32 or ring.stride(0) != 1 or not len(ring):
        raise ValueError("history_lookup: ring must be a non-empty contiguous int32 [H]")
    if drafts.shape != (rows, num_tokens) or drafts.dtype != torch.int32 or drafts.stride(1) != 1:
        raise ValueError(f"history_lookup: drafts must be int32 [{rows}, {num_tokens}], rows "
                         "contiguous")  # fmt: skip
