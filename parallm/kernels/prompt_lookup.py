"""Prompt lookup on the GPU: each sequence's drafts from its own tokens, held on the device.

The device twin of ``parallm.engine.spec.ngram.propose_ngram`` (and of ``prompt_lookup_ref``):
for each row, the longest n in ``[min_n, max_n]`` whose last-n-token suffix also occurs
earlier wins; among its earlier occurrences (each ending before the last token) the latest;
the drafts are the tokens that followed it, repeated with that period where the sequence ends
first (a repeating run). Nothing here waits for the host, so a verify graph can draft its next
step itself.

Two kernels. The first gives every (row, chunk of end positions) a program: for each end
position ``e`` it counts how many tokens ending at ``e`` match the row's last tokens (up to
``max_n``), and for each n the latest ``e`` that matches n tokens goes into ``latest[row, n]``
by an atomic max, so a long context is scanned by many programs at once. The second picks each
row's longest n that matched, gathers the drafts after it, and resets ``latest`` for the next
call (the buffer lives in a captured graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256  # end positions a program scans
_NO_MATCH = -1  # "no match yet" in ``latest``: below every position
_NONE = tl.constexpr(_NO_MATCH)


@triton.jit(do_not_specialize=["stride_row"])
def _match_kernel(tokens_ptr, lengths_ptr, latest_ptr, stride_row, MAX_N: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    size = tl.load(lengths_ptr + row)
    ends = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # An occurrence ends before the last token: e <= size - 2.
    live = ends <= size - 2
    base = tokens_ptr + row.to(tl.int64) * stride_row
    matched = tl.zeros([BLOCK], dtype=tl.int32)
    still = live
    for i in tl.static_range(MAX_N):
        want = tl.load(base + tl.maximum(size - 1 - i, 0))  # used only where e >= i
        # A live end has i <= e <= size - 2, so the row's i-th token back exists too.
        got = tl.load(base + ends - i, mask=still & (ends >= i), other=-2)
        still = still & (ends >= i) & (got == want)
        matched += still.to(tl.int32)
    publish_latest(latest_ptr, row, matched, live, ends, MAX_N, BLOCK_N)


@triton.jit
def publish_latest(latest_ptr, row, matched, live, key, MAX_N: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    """For each n in ``1..MAX_N``: the largest ``key`` of this program's live end positions
    whose last ``matched`` tokens match at least n, into ``latest[row, n]`` by an atomic max
    (many programs scan one row; ``key`` orders the ends, newest highest)."""
    n = tl.arange(0, BLOCK_N)
    hits = (matched[None, :] >= n[:, None]) & live[None, :]
    last = tl.max(tl.where(hits, key[None, :], _NONE), axis=1)
    keep = (n >= 1) & (n <= MAX_N) & (last > _NONE)
    tl.atomic_max(latest_ptr + row * BLOCK_N + n, last, mask=keep, sem="relaxed")


@triton.jit(do_not_specialize=["stride_row", "stride_drafts"])
def _gather_kernel(tokens_ptr, lengths_ptr, latest_ptr, drafts_ptr, counts_ptr, stride_row,
                   stride_drafts, min_n, max_n, num_tokens, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    size = tl.load(lengths_ptr + row)
    n = tl.arange(0, BLOCK_N)
    last = tl.load(latest_ptr + row * BLOCK_N + n)
    best, end = pick_longest(last, n, min_n, max_n, size - 1)
    start = end + 1
    count = tl.where(best > 0, num_tokens, 0)
    period = tl.maximum(size - start, 1)  # >= 1 with a match: it ends before the last token
    j = tl.arange(0, BLOCK_K)
    base = tokens_ptr + row.to(tl.int64) * stride_row
    drafts = tl.load(base + start + j % period, mask=j < count, other=0)
    tl.store(drafts_ptr + row * stride_drafts + j, drafts, mask=j < num_tokens)
    tl.store(counts_ptr + row, count)
    tl.store(latest_ptr + row * BLOCK_N + n, tl.full([BLOCK_N], _NONE, tl.int32))


@triton.jit
def pick_longest(found, n, min_n, max_n, longest):
    """The longest n in ``[min_n, min(max_n, longest)]`` that matched (``found``: the row's
    ``latest`` over ``n``), 0 if none, and its match's key (0 if none)."""
    ok = (n >= min_n) & (n <= max_n) & (n <= longest) & (found > _NONE)
    best = tl.max(tl.where(ok, n, 0), axis=0)
    return best, tl.max(tl.where((n == best) & ok, found, 0), axis=0)


def lookup_buffer(rows: int, max_n: int, device: torch.device | str) -> torch.Tensor:
    """The scratch ``latest`` matches of ``prompt_lookup``: ``[rows, BLOCK_N]`` int32 set to
    "none"; each call leaves it so again. One per graph (calls must not overlap)."""
    width = triton.next_power_of_2(max_n + 1)
    return torch.full((rows, width), _NO_MATCH, dtype=torch.int32, device=device)


def prompt_lookup(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    num_tokens: int,
    min_n: int,
    max_n: int,
    *,
    latest: torch.Tensor | None = None,
    drafts: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's drafts: ``(drafts [B, num_tokens] int32, counts [B] int32)``, row ``b``'s
    first ``counts[b]`` drafts valid (``num_tokens`` where its lookup matched, else 0), the
    rest 0.

    tokens: ``[B, L]`` int32 (row ``b``'s sequence in its first ``lengths[b]`` columns; rows
    contiguous); lengths: ``[B]`` int32, each at most L. ``latest`` (``lookup_buffer``),
    ``drafts`` and ``counts`` may be given to write into, as a captured graph does.
    """
    if num_tokens < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"prompt_lookup: need num_tokens >= 1 and 1 <= min_n <= max_n, got "
                         f"num_tokens={num_tokens}, min_n={min_n}, max_n={max_n}")  # fmt: skip
    if tokens.dim() != 2 or tokens.dtype != torch.int32 or tokens.stride(1) != 1:
        raise ValueError("prompt_lookup: tokens must be int32 [B, L] with contiguous rows")
    rows, width = tokens.shape
    if lengths.shape != (rows,) or lengths.dtype != torch.int32:
        raise ValueError(f"prompt_lookup: lengths must be int32 [{rows}]")
    if latest is None:
        latest = lookup_buffer(rows, max_n, tokens.device)
    block_n = triton.next_power_of_2(max_n + 1)
    if latest.shape != (rows, block_n) or latest.dtype != torch.int32:
        raise ValueError(f"prompt_lookup: latest must be lookup_buffer({rows}, {max_n})")
    if drafts is None:
        drafts = torch.empty((rows, num_tokens), dtype=torch.int32, device=tokens.device)
    if counts is None:
        counts = torch.empty((rows,), dtype=torch.int32, device=tokens.device)
    if drafts.shape != (rows, num_tokens) or drafts.dtype != torch.int32 or drafts.stride(1) != 1:
        raise ValueError(f"prompt_lookup: drafts must be int32 [{rows}, {num_tokens}], rows "
                         "contiguous")  # fmt: skip
    if counts.shape != (rows,) or counts.dtype != torch.int32:
        raise ValueError(f"prompt_lookup: counts must be int32 [{rows}]")
    if rows == 0 or width == 0:  # no row holds a token: nothing recurs
        drafts.zero_()
        counts.zero_()
        return drafts, counts
    _match_kernel[(rows, triton.cdiv(width, _BLOCK))](
        tokens, lengths, latest, tokens.stride(0), MAX_N=max_n, BLOCK_N=block_n, BLOCK=_BLOCK
    )
    _gather_kernel[(rows,)](
        tokens, lengths, latest, drafts, counts, tokens.stride(0), drafts.stride(0), min_n,
        max_n, num_tokens, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(num_tokens),
    )  # fmt: skip
    return drafts, counts
