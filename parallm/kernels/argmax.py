"""Greedy sampling on the GPU: a two-stage Triton argmax over the vocabulary.

The first stage splits each row into chunks across the GPU (PyTorch's argmax reduces a row in
one block), the second picks the best chunk; neither synchronises with the host, so both are
captured in the decode graph. The result equals ``torch.argmax`` (``argmax_ref``): on ties the
first index wins. NaN counts as +inf (PyTorch ranks NaN above +inf; a row holding both then
differs, which healthy logits never do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from parallm.kernels.pdl import pdl_launch, wait_for_producer

# A decode step's inputs advanced to the next token, written by the step itself (``advance_row``
# inside the argmax's last kernel) so that a greedy continuation of the same batch needs no
# input copy until a block table changes:
#
#     position += 1; seq_len += 1;
#     slot = block_tables[row, min(position // block_size, max_blocks - 1)] * block_size
#            + position % block_size
#
# (the column is clamped so a row at its last block never reads past its table; the host's real
# slot then differs and it copies).

_CHUNK = 4096
_MAX_CHUNKS = 1024  # rows up to 4M columns; vocabularies are far smaller


@dataclass
class DecodeInputs:
    """The device buffers a decode graph reads: positions [B] int64, seq_lens [B] int32,
    slot_mapping [B] int64 and block_tables [B, max_blocks] int32 (rows contiguous)."""

    positions: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    block_size: int

    def check(self, rows: int) -> None:
        want = {"positions": torch.long, "seq_lens": torch.int32, "slot_mapping": torch.long}
        for name, dtype in want.items():
            t = getattr(self, name)
            if t.shape != (rows,) or t.dtype != dtype or t.stride(0) != 1:
                raise ValueError(f"next inputs: {name} must be a contiguous {dtype} [{rows}]")
        tables = self.block_tables
        if tables.dim() != 2 or tables.shape[0] != rows or tables.dtype != torch.int32 or (
            tables.stride(1) != 1
        ):  # fmt: skip
            raise ValueError(f"next inputs: block_tables must be int32 [{rows}, max_blocks], "
                             "contiguous rows")  # fmt: skip
        if self.block_size < 1:
            raise ValueError(f"next inputs: block_size must be >= 1, got {self.block_size}")


@triton.jit
def _chunk_argmax_kernel(
    x_ptr, stride_row, n_cols, val_ptr, idx_ptr, n_chunks, turn_ptr, CHUNK: tl.constexpr,
    FLIP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_producer(PDL)  # after the LM head GEMV of a one-row step
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
    """Advance row ``row`` of a decode step's inputs by one token (see the top of this module;
    ``advance_inputs_ref`` is the reference)."""
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
    wait_for_producer(PDL)
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


def triton_argmax(
    logits: torch.Tensor,
    *,
    also_into: torch.Tensor | None = None,
    advance: DecodeInputs | None = None,
    host_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for a 2-D tensor with contiguous rows; int64 ``[rows]``.

    Never synchronises with the host, so it can be captured in a CUDA graph. ``also_into``
    (int64 ``[rows]``, contiguous) receives the same ids in the same kernel: a decode graph
    writes them straight into its own input ids for the next step. ``advance``: that graph's
    other inputs, advanced by one token in the same kernel (see the top of this module).
    ``host_ids = (ids, turn)``: the ids also go to row ``turn`` of ``ids`` (pinned host memory
    ``[2, rows]`` int64, mapped into the GPU's address space); the first kernel flips the device
    ``turn`` ([1] int32) first, so consecutive calls alternate rows.
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
    ring_ids, turn = host_ids if host_ids is not None else (None, None)
    pinned = ring_ids is None or ring_ids.is_pinned() or not logits.is_cuda
    if ring_ids is not None and (ring_ids.shape != (2, rows) or not pinned):
        raise ValueError(f"host_ids[0] must be pinned int64 [2, {rows}]")
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return out
    vals = torch.empty(rows, n_chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, n_chunks, dtype=torch.int32, device=logits.device)
    turn = turn if turn is not None else idx  # placeholder: FLIP is off
    _chunk_argmax_kernel[(rows, n_chunks)](
        logits, logits.stride(0), cols, vals, idx, n_chunks, turn, CHUNK=_CHUNK,
        FLIP=ring_ids is not None, **pdl_launch(logits, pdl),
    )  # fmt: skip
    chunks = max(16, triton.next_power_of_2(n_chunks))
    also = also_into if also_into is not None else out
    nxt = advance or DecodeInputs(out, idx, out, idx, 1)  # placeholders: ADVANCE is off
    tables = nxt.block_tables
    _best_chunk_kernel[(rows,)](
        vals, idx, out, also, n_chunks, nxt.positions, nxt.seq_lens, nxt.slot_mapping, tables,
        tables.stride(0), tables.shape[-1], ring_ids if ring_ids is not None else out,
        turn, CHUNKS=chunks, ALSO=also_into is not None, ADVANCE=advance is not None,
        BLOCK_SIZE=nxt.block_size, HOST=ring_ids is not None, **pdl_launch(logits, pdl),
    )  # fmt: skip
    return out


def advance_inputs_ref(
    positions: np.ndarray,
    seq_lens: np.ndarray,
    slot_mapping: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
) -> None:
    """Reference twin of ``advance_row`` on host arrays, in place. The decode graph also uses it
    to predict what its inputs hold after a replay, so the two must agree exactly."""
    positions += 1
    seq_lens += 1
    cols = np.minimum(positions // block_size, block_tables.shape[1] - 1)
    blocks = block_tables[np.arange(len(positions)), cols].astype(np.int64)
    slot_mapping[:] = blocks * block_size + positions % block_size
