"""Greedy sampling on the GPU: a two-stage Triton argmax over the vocabulary.

PyTorch's argmax reduces a row of a vocabulary in one block, which leaves most of the GPU idle.
Here the first stage splits each row into chunks across the card and the second picks the best
chunk; neither synchronises with the host, so both are captured in the decode graph. The
result equals ``torch.argmax`` (``argmax_ref`` is its twin): on ties
the first index wins. NaN counts as +inf (PyTorch ranks NaN above +inf; a row holding both
then differs, which healthy logits never do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parallm.engine.next_inputs import DecodeInputs
from parallm.kernels.pdl import pdl_launch, start_small_kernel

_CHUNK = 4096
_MAX_CHUNKS = 1024  # rows up to 4M columns; vocabularies are far smaller


@triton.jit
def _chunk_argmax_kernel(
    x_ptr, stride_row, n_cols, val_ptr, idx_ptr, n_chunks, turn_ptr, CHUNK: tl.constexpr,
    FLIP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    start_small_kernel(PDL)  # after the LM head GEMV of a one-row step
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if FLIP and row == 0 and chunk == 0:  # HostRing: this call writes the other host row
        tl.store(turn_ptr, 1 - tl.load(turn_ptr))
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_row + cols, mask=cols < n_cols, other=-float("inf"))
    x = x.to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    best, where = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * n_chunks + chunk, best)
    tl.store(idx_ptr + row * n_chunks + chunk, chunk * CHUNK + where)


@triton.jit
def advance_row(row, pos_ptr, len_ptr, slot_ptr, table_ptr, stride_table, max_blocks,
                BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """Advance row ``row`` of a decode step's inputs by one token, exactly as
    ``parallm.engine.next_inputs`` describes (and its host and torch versions compute)."""
    pos = tl.load(pos_ptr + row) + 1
    length = tl.load(len_ptr + row) + 1
    col = tl.minimum(pos // BLOCK_SIZE, max_blocks - 1)
    block = tl.load(table_ptr + row * stride_table + col).to(tl.int64)
    tl.store(pos_ptr + row, pos)
    tl.store(len_ptr + row, length)
    tl.store(slot_ptr + row, block * BLOCK_SIZE + pos % BLOCK_SIZE)


@triton.jit
def _best_chunk_kernel(val_ptr, idx_ptr, out_ptr, also_ptr, n_chunks, pos_ptr, len_ptr,
                       slot_ptr, table_ptr, stride_table, max_blocks, ring_ptr, turn_ptr,
                       CHUNKS: tl.constexpr, ALSO: tl.constexpr, ADVANCE: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, HOST: tl.constexpr,
                       PDL: tl.constexpr):  # fmt: skip
    start_small_kernel(PDL)
    row = tl.program_id(0)
    if ADVANCE:  # independent of the argmax: rides along in this kernel rather than its own
        advance_row(row, pos_ptr, len_ptr, slot_ptr, table_ptr, stride_table, max_blocks,
                    BLOCK_SIZE)  # fmt: skip
    offs = tl.arange(0, CHUNKS)
    mask = offs < n_chunks
    vals = tl.load(val_ptr + row * n_chunks + offs, mask=mask, other=-float("inf"))
    idx = tl.load(idx_ptr + row * n_chunks + offs, mask=mask, other=2**31 - 1)
    best = tl.max(vals, axis=0)
    # Chunks are in column order and each holds its first best, so the smallest index among
    # the chunks reaching the maximum is the row's first best.
    first = tl.min(tl.where(vals == best, idx, 2**31 - 1), axis=0)
    tl.store(out_ptr + row, first.to(tl.int64))
    if ALSO:
        tl.store(also_ptr + row, first.to(tl.int64))
    if HOST:  # pinned host memory, mapped: no copy op after the kernel
        turn = tl.load(turn_ptr)
        tl.store(ring_ptr + turn * tl.num_programs(0) + row, first.to(tl.int64))


@dataclass
class HostRing:
    """Where a decode graph's argmax also writes its ids on the host: two rows of pinned
    memory ``ids [2, rows]`` int64 (mapped into the GPU's address space) and a device ``turn``.

    Every call flips the turn in its first kernel and writes ``ids[turn]`` in its last, so
    consecutive calls alternate rows. The host mirrors the turn (:meth:`flip` once per call)
    and, after the call's event, reads its row without any device-to-host copy on the
    stream (a batch-1 step of a 1B model on an H100 idled ~10 us around that copy). The row
    is rewritten two calls later, so it must be read (or cloned) before that call is made.
    """

    ids: torch.Tensor
    turn: torch.Tensor
    host_turn: int = 0

    @classmethod
    def allocate(cls, rows: int, device: torch.device) -> HostRing:
        ids = torch.zeros(2, rows, dtype=torch.long, pin_memory=device.type == "cuda")
        return cls(ids, torch.zeros(1, dtype=torch.int32, device=device))

    def flip(self) -> torch.Tensor:
        """Mirror one call's flip; returns the row that call writes."""
        self.host_turn ^= 1
        return self.ids[self.host_turn]

    def reset(self) -> None:
        """Back to turn 0 on both sides (after calls the host did not mirror)."""
        self.turn.zero_()
        self.host_turn = 0


def triton_argmax(
    logits: torch.Tensor,
    also_into: torch.Tensor | None = None,
    advance: DecodeInputs | None = None,
    host_ring: HostRing | None = None,
) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for a 2-D tensor with contiguous rows; int64 ``[rows]``.

    Never synchronises with the host, so it can be captured in a CUDA graph. ``also_into``
    (int64 ``[rows]``, contiguous) receives the same ids in the same kernel: a decode graph
    writes them straight into its own input ids for the next step. ``advance``: that graph's
    other inputs, advanced by one token in the same kernel (``parallm.engine.next_inputs``).
    ``host_ring``: the ids also go to pinned host memory (:class:`HostRing`).
    """
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be 2-D with contiguous rows, got {tuple(logits.shape)}")
    rows, cols = logits.shape
    n_chunks = triton.cdiv(cols, _CHUNK)
    if n_chunks > _MAX_CHUNKS:
        raise ValueError(f"rows of {cols} columns exceed the {_CHUNK * _MAX_CHUNKS} supported")
    if also_into is not None and (also_into.shape != (rows,) or also_into.dtype != torch.long
                                  or also_into.stride(0) != 1):  # fmt: skip
        raise ValueError(f"also_into must be a contiguous int64 [{rows}] tensor")
    if advance is not None:
        advance.check(rows)
    pinned = host_ring is None or host_ring.ids.is_pinned() or not logits.is_cuda
    if host_ring is not None and (host_ring.ids.shape != (2, rows) or not pinned):
        raise ValueError(f"host_ring.ids must be pinned int64 [2, {rows}]")
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    vals = torch.empty(rows, n_chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, n_chunks, dtype=torch.int32, device=logits.device)
    turn = host_ring.turn if host_ring is not None else idx  # placeholder: FLIP is off
    _chunk_argmax_kernel[(rows, n_chunks)](
        logits, logits.stride(0), cols, vals, idx, n_chunks, turn, CHUNK=_CHUNK,
        FLIP=host_ring is not None, **pdl_launch(logits),
    )  # fmt: skip
    chunks = max(16, triton.next_power_of_2(n_chunks))
    also = also_into if also_into is not None else out
    nxt = advance or DecodeInputs(out, idx, out, idx, 1)  # placeholders: ADVANCE is off
    tables = nxt.block_tables
    _best_chunk_kernel[(rows,)](
        vals, idx, out, also, n_chunks, nxt.positions, nxt.seq_lens, nxt.slot_mapping, tables,
        tables.stride(0), tables.shape[-1], host_ring.ids if host_ring is not None else out,
        turn, CHUNKS=chunks, ALSO=also_into is not None, ADVANCE=advance is not None,
        BLOCK_SIZE=nxt.block_size, HOST=host_ring is not None, **pdl_launch(logits),
    )  # fmt: skip
    return out
