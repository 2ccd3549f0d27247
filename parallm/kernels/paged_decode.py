"""Paged decode attention in Triton (flash decoding): one new token per sequence over its
paged KV cache, the context cut into splits that the last split to finish merges, optionally
with rotary and the KV store of the new token in the same kernel.

A program's work grows with its row's context. Past about four programs an SM there are no
splits, and the programs run in waves: under a serving load, whose contexts run from tens of
tokens to thousands, a long row whose programs start in the last wave runs on alone after the
others finish. Programs start in row order, so callers that know the lengths on the host give
the rows longest first (``row_order``), as FlashAttention 3's varlen scheduler can sort its
batches (``varlen_sort_batches``). On the Azure trace's contexts one Llama-3.1-8B layer runs
1.07-1.23x faster longest first at 32-256 rows (``benchmarks/decode_order_bench.py``).

The cache layout, fp8 scales and shared-memory fitting are ``paged_kv``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from parallm.kernels.elementwise import _NO_FMA
from parallm.kernels.paged_kv import (
    DEFAULT_SMS,
    FP8_KV,
    LOG2E,
    check_paged_inputs,
    device_sms,
    dot_precision,
    fit_kv_tiles,
    kernel_strides,
    kv_scale_arg,
    output_buffer,
    page_rows,
    shared_memory_bytes,
)
from parallm.kernels.pdl import pdl_launch, wait_for_producer
from parallm.kernels.rope_store import NewTokenRope, load_kv_scales, rope_and_store

# Aim for up to this many programs per SM so that HBM stays busy while some stall.
_DECODE_PROGRAMS_PER_SM = 4
# Every split covers at least this many keys, so the partial-result traffic and the reduction
# stay small next to the K/V bytes a split reads.
_DECODE_MIN_KEYS_PER_SPLIT = 128
_DECODE_MAX_SPLITS = 64
# Tile: keys per loop step (before fitting shared memory), warps and pipeline stages.
_DECODE_BLOCK_N = 128
_DECODE_NUM_WARPS = 4
_DECODE_NUM_STAGES = 2


# Arguments that follow the step's longest sequence are not specialized: each new value class
# (== 1, a multiple of 16) would compile the kernel again mid-serving, outside the graphs.
# (split_len is always a multiple of the key tile, so it keeps its divisibility hint.)
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    counter_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    kv_scale_ptr,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    qk_scale,
    split_len,
    num_splits,
    kn_ptr,
    vn_ptr,
    stride_knb,
    stride_knh,
    stride_vnb,
    stride_vnh,
    cos_ptr,
    sin_ptr,
    stride_cos,
    stride_sin,
    pos_ptr,
    slot_ptr,
    row_order_ptr,
    NUM_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROPE: tl.constexpr,
    KV_FP8: tl.constexpr,
    ORDERED: tl.constexpr,
    PDL: tl.constexpr,
):
    # The grid runs KV heads fastest, then rows: programs start in row order, so rows given
    # longest first (``row_order``) start their long programs first (module docstring).
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    if ORDERED:
        seq = tl.load(row_order_ptr + seq)
    split = tl.program_id(2)

    # Lengths and block tables are step inputs, copied in before any kernel of the step ran:
    # under PDL they (and the first keys' pages) load before waiting for q/k/v's producer.
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_len
    if start >= seq_len:
        return
    end = tl.minimum(start + split_len, seq_len)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = start + tl.arange(0, BLOCK_N)
    pages = tl.load(table + offs_n // PAGE_SIZE, mask=offs_n < end, other=0).to(tl.int64)
    wait_for_producer(PDL)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_valid = offs_g < NUM_GROUPS
    d_valid = offs_d < HEAD_DIM
    heads = kv_head * NUM_GROUPS + offs_g
    q_row = q_ptr + seq.to(tl.int64) * stride_qb
    k_scale, v_scale = load_kv_scales(kv_scale_ptr, KV_FP8)
    if ROPE:
        # q, k and v are this step's raw projections: rotate q here, and the split that holds
        # the new token rotates k and stores k and v in the cache before it reads the cache.
        q = rope_and_store(
            q_row, kn_ptr, vn_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, seq,
            kv_head, heads, g_valid, d_valid, offs_d, stride_qh, stride_knb, stride_knh,
            stride_vnb, stride_vnh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
            stride_vh, stride_cos, stride_sin, end == seq_len, k_scale, v_scale, HEAD_DIM,
            PAGE_SIZE, q_ptr.dtype.element_ty,
        ).to(q_ptr.dtype.element_ty)  # fmt: skip
    else:
        q_ptrs = q_row + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=g_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        in_page = offs_n % PAGE_SIZE
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k_ptrs = page_rows(k_ptr, pages, in_page, kv_head, stride_kb, stride_kt, stride_kh, offs_d)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v_ptrs = page_rows(v_ptr, pages, in_page, kv_head, stride_vb, stride_vt, stride_vh, offs_d)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # issued with K: one memory round trip
        k, v = k.to(q.dtype), v.to(q.dtype)  # exact for e4m3
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(n_valid[None, :], qk * (qk_scale * k_scale), float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        # The next keys' pages: loaded here so the table read overlaps this block's math.
        next_n = offs_n + BLOCK_N
        pages = tl.load(table + next_n // PAGE_SIZE, mask=next_n < end, other=0).to(tl.int64)

    acc = acc / l_i[:, None]
    if KV_FP8:
        acc = acc * v_scale
    store_mask = g_valid[:, None] & d_valid[None, :]
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    used_splits = tl.cdiv(seq_len, split_len)
    if not SPLIT or used_splits == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Partials are [B, Hq, num_splits, BLOCK_D] float32 and the lse is [B, Hq, num_splits].
        part_rows = (seq.to(tl.int64) * (NUM_GROUPS * tl.num_programs(0)) + heads) * num_splits
        part_ptrs = part_out_ptr + (part_rows + split)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(part_ptrs, acc, mask=store_mask)
        tl.store(part_lse_ptr + part_rows + split, m_i + tl.log2(l_i), mask=g_valid)
        # The last split to finish merges them all: no second kernel launch. Every thread's
        # stores are issued before the barrier, and the release makes them visible with the
        # count; the last one's acquire orders its loads (which bypass L1) after all of them.
        tl.debug_barrier()
        counter = counter_ptr + seq * tl.num_programs(0) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == used_splits - 1:
            merged = _merge_splits(part_out_ptr, part_lse_ptr, part_rows, used_splits, offs_d,
                                   g_valid, BLOCK_G, BLOCK_D)  # fmt: skip
            tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=store_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, part_rows, used_splits, offs_d, g_valid,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Softmax-weighted sum of the split partials of a program's query heads, in split order."""
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for s in range(0, used_splits):
        lse = tl.load(part_lse_ptr + part_rows + s, mask=g_valid, other=0.0, cache_modifier=".cg")
        m = tl.maximum(m, lse)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s in range(0, used_splits):
        lse = tl.load(part_lse_ptr + part_rows + s, mask=g_valid, other=0.0, cache_modifier=".cg")
        w = tl.exp2(lse - m)
        part = tl.load(
            part_out_ptr + (part_rows + s)[:, None] * BLOCK_D + offs_d[None, :],
            mask=g_valid[:, None], other=0.0, cache_modifier=".cg",
        )  # fmt: skip
        acc += part * w[:, None]
        total += w
    return acc / total[:, None]


@dataclass(frozen=True)
class _DecodeConfig:
    block_g: int
    block_n: int
    num_warps: int
    num_stages: int


def _decode_config(head_dim: int, groups: int, elem_bytes: int, smem_bytes: int) -> _DecodeConfig:
    # tl.dot needs at least 16 rows: pad the query heads of a KV head up to that.
    block_g = max(16, triton.next_power_of_2(groups))
    block_n, stages = fit_kv_tiles(
        block_g, _DECODE_BLOCK_N, _DECODE_NUM_STAGES, triton.next_power_of_2(head_dim),
        elem_bytes, smem_bytes,
    )  # fmt: skip
    return _DecodeConfig(block_g, block_n, _DECODE_NUM_WARPS, stages)


def _no_rope_args(q: torch.Tensor) -> tuple:
    return (q, q, 0, 0, 0, 0, q, q, 0, 0, q, q)


def decode_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = DEFAULT_SMS
) -> int:
    """How many context splits decode uses so that ``batch * num_kv_heads * splits`` fills the
    GPU."""
    programs = batch * num_kv_heads
    target = _DECODE_PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    splits = target // programs
    splits = min(splits, max(1, max_seq_len // _DECODE_MIN_KEYS_PER_SPLIT))
    return max(1, min(splits, _DECODE_MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    out: torch.Tensor | None = None,
    rope: NewTokenRope | None = None,
    split_counters: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    pdl: bool = False,
    row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache (flash decoding);
    ``[B, Hq, D]`` in q's dtype. The arguments are ``paged_prefill_attention``'s for one query
    per sequence (at position ``seq_lens[b] - 1``), except:

    The context is cut into ``decode_num_splits`` ranges handled by separate programs; the
    last of a (sequence, KV head)'s programs to finish merges the partial results (one launch;
    a context that fits one split skips the merge). All ``Hq / Hkv`` query heads of a KV head
    share one program, so each K/V block is read once per KV head. ``max_seq_len`` bounds
    ``seq_lens`` and shapes the grid: keep it fixed when the call is captured in a CUDA graph.

    ``rope``: this step's raw k and v and the rotary tables; q is then the raw query, and the
    kernel rotates q and k and stores k and v (quantized with ``kv_scale`` in an fp8 cache) as
    ``rotary_and_store_kv`` would before a plain call. ``split_counters``: the merge's arrival
    counters from :func:`new_split_counters` (None: zeroed ones for this call). Every call
    leaves them at zero, so one buffer serves every layer and step, but calls sharing it must
    not run concurrently (on different streams).

    ``row_order``: ``[B]`` int32, a permutation of the rows, the order in which their programs
    start (``longest_first``). Where there are more programs than the GPU runs at once, a long
    row started last finishes alone after the rest; started first, it overlaps them.
    """
    check_paged_inputs(q, k_cache, v_cache, kv_scale)
    _check_row_order(row_order, q.shape[0])
    if rope is not None:
        rope.check(q, k_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    groups = num_heads // num_kv_heads
    out = output_buffer(q, out)
    if batch == 0:
        return out
    cfg = _decode_config(head_dim, groups, q.element_size(), shared_memory_bytes(q.device))
    block_d, block_n = triton.next_power_of_2(head_dim), cfg.block_n
    max_seq_len = max(int(max_seq_len), 1)
    num_splits = decode_num_splits(batch, num_kv_heads, max_seq_len, device_sms(q.device))
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, split_len)

    if num_splits > 1:
        part_out = torch.empty(
            (batch, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        counters = _checked_counters(split_counters, batch * num_kv_heads, q.device)
    else:
        part_out = part_lse = counters = out  # unused: the kernel writes `out` directly
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        counters,
        block_tables,
        seq_lens,
        kv_scale_arg(k_cache, kv_scale),
        *kernel_strides(q, out, k_cache, v_cache, block_tables),
        scale * LOG2E,
        split_len,
        num_splits,
        *(rope.kernel_args() if rope is not None else _no_rope_args(q)),
        row_order if row_order is not None else q,  # any pointer when unordered (unread)
        NUM_GROUPS=groups,
        BLOCK_G=cfg.block_g,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        DOT_PRECISION=dot_precision(q.dtype),
        ROPE=rope is not None,
        KV_FP8=k_cache.dtype == FP8_KV,
        ORDERED=row_order is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_float32_options(q),
        **pdl_launch(q, pdl),
    )
    return out


def longest_first(seq_lens: np.ndarray) -> np.ndarray:
    """``row_order`` for rows of these context lengths: longest first, ties in row order."""
    return np.argsort(-np.asarray(seq_lens, dtype=np.int64), kind="stable").astype(np.int32)


def _check_row_order(row_order: torch.Tensor | None, batch: int) -> None:
    if row_order is None:
        return
    if row_order.dtype != torch.int32 or tuple(row_order.shape) != (batch,):
        raise ValueError(f"row_order must be [{batch}] int32 (a permutation of the rows), got "
                         f"{tuple(row_order.shape)} {row_order.dtype}")  # fmt: skip


def _float32_options(q: torch.Tensor) -> dict:
    """float32 decode compiles without FMA contraction, with rotary in the kernel or not: in
    float32 nothing rounds between rotary's products and their sum, so a fused multiply-add
    would store k one ulp off ``rotary_and_store_kv``'s (compiled without fusion), and the
    kernel with rotary must attend exactly as the one without. bf16/fp16 round each product
    explicitly, which already rules the fusion out there."""
    return _NO_FMA if q.dtype == torch.float32 else {}


def new_split_counters(device: torch.device) -> torch.Tensor:
    """Zeroed arrival counters for :func:`paged_decode_attention`'s ``split_counters``.

    Enough for every call on ``device`` that ``decode_num_splits`` splits: a split happens
    only while ``B * Hkv`` is below the programs-per-SM target times the SM count.
    """
    size = _DECODE_PROGRAMS_PER_SM * device_sms(torch.device(device))
    return torch.zeros(size, dtype=torch.int32, device=device)


def _checked_counters(
    counters: torch.Tensor | None, needed: int, device: torch.device
) -> torch.Tensor:
    if counters is None:
        return torch.zeros(needed, dtype=torch.int32, device=device)
    if counters.dtype != torch.int32 or counters.device != device or counters.numel() < needed:
        raise ValueError(
            f"split_counters must be int32 on {device} with at least {needed} elements, got "
            f"{counters.dtype} on {counters.device} with {counters.numel()}"
        )
    return counters
