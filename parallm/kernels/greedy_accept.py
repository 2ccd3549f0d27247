"""Greedy acceptance of a verify step on the GPU, appended to each sequence's device tokens.

A verify step gives each sequence ``q`` rows: its known token, then its drafts (``counts[b]``
real ones, the rest padding). Row ``j``'s argmax is the target's token after row ``j``'s
input, so draft ``j + 1`` is accepted while it equals row ``j``'s argmax, and the first row
whose next input differs (or the last real draft's row) gives the bonus token. The sequence
then emits its argmax rows ``0 .. a`` (``a`` drafts accepted, then the bonus), which this
appends to its tokens on the device, where the next step's prompt lookup reads them: no host
round trip between one verify step and the next. The twin is ``greedy_accept_ref``; the host's
own walk over the same rows is ``parallm.engine.spec.verify``'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_row"])
def _accept_kernel(argmax_ptr, ids_ptr, counts_ptr, tokens_ptr, lengths_ptr, accepted_ptr,
                   width, stride_row, Q: tl.constexpr, BLOCK_Q: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK_Q)
    rows = row * Q + j
    best = tl.load(argmax_ptr + rows, mask=j < Q, other=-1)
    after = tl.load(ids_ptr + rows + 1, mask=j < Q - 1, other=-2)  # row j's next input
    count = tl.load(counts_ptr + row)
    taken = (j < count) & (best == after)
    accepted = tl.min(tl.where(taken, BLOCK_Q, j), axis=0)  # the first draft not taken
    size = tl.load(lengths_ptr + row)
    # Emitted: argmax rows 0 .. accepted (the accepted drafts equal them, then the bonus).
    tokens = tokens_ptr + row.to(tl.int64) * stride_row
    tl.store(tokens + size + j, best.to(tl.int32), mask=(j <= accepted) & (size + j < width))
    tl.store(lengths_ptr + row, tl.minimum(size + accepted + 1, width))
    tl.store(accepted_ptr + row, accepted)


def greedy_accept(
    argmax_rows: torch.Tensor,
    step_ids: torch.Tensor,
    counts: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    accepted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence's accepted drafts ``[B]`` int32; appends what it emitted (its argmax rows
    ``0 .. accepted``) to ``tokens`` in place and advances ``lengths``.

    argmax_rows: ``[B * q]`` int64, the step's argmax row by row; step_ids: ``[B * q]`` (any
    integer dtype), its inputs, each sequence's known token then its drafts; counts: ``[B]``
    int32, each sequence's real drafts (at most ``q - 1``); tokens ``[B, L]`` int32 (rows
    contiguous) and lengths ``[B]`` int32, each sequence's tokens so far. A row full up to L
    keeps what fits (the scheduler stops a sequence before that).
    """
    rows = lengths.shape[0]
    if tokens.dim() != 2 or tokens.dtype != torch.int32 or tokens.stride(1) != 1:
        raise ValueError("greedy_accept: tokens must be int32 [B, L] with contiguous rows")
    if tokens.shape[0] != rows or lengths.dtype != torch.int32 or counts.shape != (rows,) or (
        counts.dtype != torch.int32
    ):  # fmt: skip
        raise ValueError(f"greedy_accept: lengths and counts must be int32 [{tokens.shape[0]}]")
    if rows == 0 or argmax_rows.numel() % rows or argmax_rows.shape != step_ids.shape:
        raise ValueError(f"greedy_accept: argmax_rows and step_ids must be [B * q] for B = {rows}")
    q = argmax_rows.numel() // rows
    if accepted is None:
        accepted = torch.empty((rows,), dtype=torch.int32, device=tokens.device)
    _accept_kernel[(rows,)](
        argmax_rows, step_ids, counts, tokens, lengths, accepted, tokens.shape[1],
        tokens.stride(0), Q=q, BLOCK_Q=triton.next_power_of_2(q),
    )  # fmt: skip
    return accepted
