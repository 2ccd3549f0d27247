"""The next verify step's inputs, written on the GPU from each sequence's device state.

After a verify step's acceptance (``greedy_accept``) and the next drafts (``prompt_lookup``),
this writes what the next verify graph replay reads, as ``VerifyGraphs`` stages it from the
host for a chain shape of ``q`` tokens a sequence: sequence ``b``'s rows ``b * q ..`` hold its
last token (the bonus token just emitted) at position ``length - 1``, then its ``counts[b]``
drafts at the positions after it, then padding rows (id 0, position 0, stored in the scratch
slot); its length counts the padding (``length - 1 + q``), which keeps the real rows at their
positions with the padding keys after them. Slots come from the block tables on the device, so
the host must have given every sequence blocks up to position ``length - 1 + q`` beforehand.
Every row is a sampling row (``sample_rows`` the identity): acceptance reads each sequence's
rows by its draft count. Padding sequences (rows past ``lengths``' batch) are left as they are.
The twin is ``stage_chain_step_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_row", "stride_drafts", "stride_table"])
def _stage_kernel(tokens_ptr, lengths_ptr, drafts_ptr, counts_ptr, tables_ptr, ids_ptr,
                  positions_ptr, slots_ptr, sample_rows_ptr, seq_lens_ptr, stride_row,
                  stride_drafts, stride_table, scratch_slot, Q: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    seq = tl.program_id(0)
    j = tl.arange(0, BLOCK_Q)
    rows = seq * Q + j
    in_step = j < Q
    size = tl.load(lengths_ptr + seq)
    count = tl.load(counts_ptr + seq)
    last = tl.load(tokens_ptr + seq.to(tl.int64) * stride_row + size - 1)
    draft = tl.load(drafts_ptr + seq * stride_drafts + j - 1, mask=(j >= 1) & (j <= count), other=0)
    real = j <= count
    ids = tl.where(j == 0, last, draft)
    positions = tl.where(real, size - 1 + j, 0)
    block = tl.load(tables_ptr + seq * stride_table + positions // BLOCK_SIZE, mask=real, other=0)
    slots = tl.where(real, block.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE, scratch_slot)
    tl.store(ids_ptr + rows, ids.to(tl.int64), mask=in_step)
    tl.store(positions_ptr + rows, positions.to(tl.int64), mask=in_step)
    tl.store(slots_ptr + rows, slots, mask=in_step)
    tl.store(sample_rows_ptr + rows, rows.to(tl.int64), mask=in_step)
    tl.store(seq_lens_ptr + seq, size - 1 + Q)


def stage_chain_step(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    drafts: torch.Tensor,
    counts: torch.Tensor,
    block_tables: torch.Tensor,
    out: dict[str, torch.Tensor],
    block_size: int,
    scratch_slot: int,
) -> None:
    """Write the next chain verify step of ``B = len(lengths)`` sequences into ``out``.

    tokens ``[B, L]`` int32 and lengths ``[B]`` int32: each sequence's tokens (its last one
    not yet in the KV cache); drafts ``[B, k]`` int32 with ``counts [B]`` int32 real ones
    (``prompt_lookup``'s); block_tables ``[S, columns]`` int32 (S >= B). ``out``: the
    shape's buffers ``input_ids``, ``positions``, ``slot_mapping``, ``sample_rows`` (int64
    ``[S * q]``) and ``seq_lens`` (int32 ``[S]``), q = ``len(input_ids) // S``, at least
    ``k + 1``.
    """
    rows = lengths.shape[0]
    size = block_tables.shape[0]
    names = ("input_ids", "positions", "slot_mapping", "sample_rows")
    if any(out[n].dtype != torch.int64 or out[n].dim() != 1 for n in names):
        raise ValueError(f"stage_chain_step: {', '.join(names)} must be int64 [S * q]")
    num_tokens = out["input_ids"].numel()
    if num_tokens % max(size, 1) or any(out[n].numel() != num_tokens for n in names):
        raise ValueError(f"stage_chain_step: every token buffer must hold S * q tokens, S = {size}")
    q = num_tokens // max(size, 1)
    if out["seq_lens"].shape != (size,) or out["seq_lens"].dtype != torch.int32:
        raise ValueError(f"stage_chain_step: seq_lens must be int32 [{size}]")
    if drafts.dim() != 2 or drafts.shape[0] != rows or drafts.shape[1] + 1 > q or (
        drafts.dtype != torch.int32 or counts.dtype != torch.int32 or counts.shape != (rows,)
    ):  # fmt: skip
        raise ValueError(f"stage_chain_step: drafts must be int32 [{rows}, k <= {q - 1}] with "
                         f"int32 counts [{rows}]")  # fmt: skip
    if rows > size or tokens.shape[0] != rows or tokens.dtype != torch.int32:
        raise ValueError(f"stage_chain_step: tokens must be int32 [{rows}, L], at most {size} rows")
    if rows == 0:
        return
    _stage_kernel[(rows,)](
        tokens, lengths, drafts, counts, block_tables, out["input_ids"], out["positions"],
        out["slot_mapping"], out["sample_rows"], out["seq_lens"], tokens.stride(0),
        drafts.stride(0), block_tables.stride(0), scratch_slot, Q=q,
        BLOCK_Q=triton.next_power_of_2(q), BLOCK_SIZE=block_size,
    )  # fmt: skip
