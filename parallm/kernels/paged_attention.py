"""Paged attention kernels in Triton: prefill (packed variable-length queries, optionally with
draft trees) and decode.

Both kernels read keys/values from the paged KV cache ``[num_blocks, block_size, Hkv, D]``
through per-sequence block tables (see docs/INTERFACES.md). Softmax runs online in float32 in
base 2 (the scale is pre-multiplied by log2(e)).

An fp8 cache (``torch.float8_e4m3fn``) holds ``k / k_scale`` and ``v / v_scale`` (``kv_scale =
[k_scale, v_scale]``, float32, per layer). The kernels load its tiles as fp8 (half the bytes)
and widen them to q's dtype, which holds every e4m3 value exactly; the scales are applied in
float32 outside the dots: ``k_scale`` with the softmax scale, ``v_scale`` to the output.

Draft trees (speculative decoding): the last ``tree_num_nodes[b]`` tokens of sequence ``b`` are
the nodes of a draft tree, and a node attends to the context before the tree and to the nodes
its ``tree_visible`` bitmask names (its ancestors and itself, bit ``j`` for node ``j``; int64,
so at most 64 nodes). Queries before the tree are causal as in any step.

CPU tensors work only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parallm.kernels.elementwise import _NO_FMA
from parallm.kernels.pdl import pdl_launch, wait_for_producer
from parallm.kernels.rope_store import NewTokenRope, check_kv_scale, load_kv_scales, rope_and_store

_LOG2E = math.log2(math.e)
_FP8_KV = torch.float8_e4m3fn

# Decode: aim for up to this many programs per SM so that HBM stays busy while some stall.
_DECODE_PROGRAMS_PER_SM = 4
# Decode: every split covers at least this many keys, so the partial-result traffic and the
# reduction stay small next to the K/V bytes a split reads.
_DECODE_MIN_KEYS_PER_SPLIT = 128
_DECODE_MAX_SPLITS = 64
# Decode tile: keys per loop step (before fitting shared memory), warps and pipeline stages.
_DECODE_BLOCK_N = 128
_DECODE_NUM_WARPS = 4
_DECODE_NUM_STAGES = 2
# Where the device cannot be asked (the interpreter on CPU): an H100's shared memory a block
# may opt into (227 KiB) and SM count.
_DEFAULT_SMEM_BYTES = 232448
_DEFAULT_SMS = 132
# Left free beyond the estimated K/V stages and Q tile: Triton's own scratch (layout conversions
# of the score tile, reductions) comes out of the same shared memory.
_SMEM_RESERVE_BYTES = 48 * 1024


@triton.jit
def _page_rows(cache_ptr, pages, in_page, kv_head, stride_b, stride_t, stride_h, offs_d):
    """Pointers to one KV head's rows ``[N, BLOCK_D]`` of a K or V cache, given each key's
    page (int64) and offset in it (prefill and decode address the cache alike)."""
    return (cache_ptr + pages[:, None] * stride_b + in_page[:, None] * stride_t
            + kv_head * stride_h + offs_d[None, :])  # fmt: skip


@triton.jit
def _tree_visible(offs_n, tree_start, visible_nodes):
    """``[M, N]``: which keys the tree mask lets each row see: every key before the tree, and
    node ``j`` where bit ``j`` of the row's ``visible_nodes`` is set."""
    node = offs_n - tree_start  # the key's node index, negative before the tree
    shift = tl.minimum(tl.maximum(node, 0), 63).to(tl.int64)
    bit = (visible_nodes[:, None] >> shift[None, :]) & 1
    return (node[None, :] < 0) | (bit != 0)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    kv_scale_ptr,
    tree_num_nodes_ptr,
    tree_visible_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    qk_scale,
    NUM_GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    HAS_TREE: tl.constexpr,
):
    # A tile's BLOCK_M rows are BLOCK_T tokens x the NUM_GROUPS query heads of one KV head
    # (token-major), so each K/V tile is loaded once for all the query heads that read it.
    BLOCK_T: tl.constexpr = BLOCK_M // NUM_GROUPS
    kv_head = tl.program_id(0)
    # Causal tiles further down a sequence cost more: schedule those first.
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_T >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    offs_r = tl.arange(0, BLOCK_M)
    offs_t = m_block * BLOCK_T + offs_r // NUM_GROUPS
    heads = kv_head * NUM_GROUPS + offs_r % NUM_GROUPS
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = (offs_r < BLOCK_T * NUM_GROUPS) & (offs_t < q_len)
    d_valid = offs_d < HEAD_DIM
    q_rows = (q_start + offs_t).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = prefix_len + offs_t
    k_scale, v_scale = load_kv_scales(kv_scale_ptr, KV_FP8)
    qk_scale = qk_scale * k_scale

    # Keys past the tile's last query position are invisible to every row; keys before its
    # first query position (and before the tree) are visible to every row, so only tiles after
    # that need a mask.
    kv_end = tl.minimum(seq_len, prefix_len + (m_block + 1) * BLOCK_T)
    unmasked_end = prefix_len + m_block * BLOCK_T
    if HAS_TREE:
        tree_start = seq_len - tl.load(tree_num_nodes_ptr + seq)
        unmasked_end = tl.minimum(unmasked_end, tree_start)
        # Rows before the tree never reach a node key (causality): their bits are unread.
        visible_nodes = tl.load(tree_visible_ptr + q_rows, mask=row_valid, other=0).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_end
        pages = tl.load(table + offs_n // PAGE_SIZE, mask=n_valid, other=0).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k_ptrs = _page_rows(k_ptr, pages, in_page, kv_head, stride_kb, stride_kt, stride_kh, offs_d)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(q.dtype)  # exact for e4m3
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if start_n + BLOCK_N > unmasked_end:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
            if HAS_TREE:
                visible = visible & _tree_visible(offs_n, tree_start, visible_nodes)
            qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new
        if HAS_TREE:
            # A node may see no key of a whole tile (a tree from key 0 whose ancestors are all
            # later): subtract 0 then, not -inf, so that the tile adds nothing instead of NaN.
            # Causal rows always see key 0, so only trees need this.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = _page_rows(v_ptr, pages, in_page, kv_head, stride_vb, stride_vt, stride_vh, offs_d)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if KV_FP8:
        acc = acc * v_scale
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
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
    PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
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
        k_ptrs = _page_rows(k_ptr, pages, in_page, kv_head, stride_kb, stride_kt, stride_kh, offs_d)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v_ptrs = _page_rows(v_ptr, pages, in_page, kv_head, stride_vb, stride_vt, stride_vh, offs_d)
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
        part_rows = (seq.to(tl.int64) * (NUM_GROUPS * tl.num_programs(1)) + heads) * num_splits
        part_ptrs = part_out_ptr + (part_rows + split)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(part_ptrs, acc, mask=store_mask)
        tl.store(part_lse_ptr + part_rows + split, m_i + tl.log2(l_i), mask=g_valid)
        # The last split to finish merges them all: no second kernel launch. Every thread's
        # stores are issued before the barrier, and the release makes them visible with the
        # count; the last one's acquire orders its loads (which bypass L1) after all of them.
        tl.debug_barrier()
        counter = counter_ptr + seq * tl.num_programs(1) + kv_head
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


def _dot_precision(dtype: torch.dtype) -> str:
    # Plain fp32 stays exact (tests compare to 1e-3); tf32 is the NVIDIA default otherwise.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _cuda_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def _properties(device: torch.device):
    """The CUDA device's properties; None for another device, which then gets the defaults."""
    if device.type != "cuda":
        return None
    return _cuda_properties(
        device.index if device.index is not None else torch.cuda.current_device()
    )


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one block of a kernel on ``device`` may use."""
    return getattr(_properties(device), "shared_memory_per_block_optin", _DEFAULT_SMEM_BYTES)


def _device_sms(device: torch.device) -> int:
    return getattr(_properties(device), "multi_processor_count", _DEFAULT_SMS)


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scale: torch.Tensor | None
) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k/v cache shapes differ or are not 4-D: {k_cache.shape}, {v_cache.shape}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, _FP8_KV):
        raise ValueError(
            f"the k/v caches must both be in q's dtype {q.dtype} or {_FP8_KV}, got "
            f"{k_cache.dtype} and {v_cache.dtype}"
        )
    check_kv_scale(k_cache, kv_scale)
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} does not match cache head dim {k_cache.shape[-1]}")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]}")
    page_size = k_cache.shape[1]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"block_size must be a power of two, got {page_size}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim")


def _check_tree_inputs(
    q: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_num_nodes: torch.Tensor | None,
    tree_visible: torch.Tensor | None,
) -> None:
    if (tree_num_nodes is None) != (tree_visible is None):
        raise ValueError("tree_num_nodes and tree_visible go together: pass both or neither")
    if tree_num_nodes is None:
        return
    if tree_num_nodes.shape != seq_lens.shape or tree_visible.shape != q.shape[:1]:
        raise ValueError(
            f"tree_num_nodes must be [B] = {tuple(seq_lens.shape)} and tree_visible [T] = "
            f"{tuple(q.shape[:1])}, got {tuple(tree_num_nodes.shape)} and "
            f"{tuple(tree_visible.shape)}"
        )
    if tree_visible.dtype != torch.int64:
        raise ValueError(f"tree_visible must be int64 bitmasks, got {tree_visible.dtype}")


def _output_buffer(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must match q {tuple(q.shape)}, unit last stride")
    return out


@dataclass(frozen=True)
class _PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _prefill_config(
    head_dim: int, max_query_len: int, groups: int, elem_bytes: int, smem_bytes: int
) -> _PrefillConfig:
    # Tiles tuned for bf16 on Hopper (benchmarks/attention_bench.py's shapes).
    if head_dim <= 64:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 128, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    # A tile's rows are tokens x the query heads of one KV head. Short queries (decode rows of
    # mixed batches) would leave most of a big tile empty.
    rows = max(max_query_len, 1) * groups
    block_m = min(block_m, max(16, triton.next_power_of_2(rows)))
    block_m = max(block_m, triton.next_power_of_2(groups))
    block_d = triton.next_power_of_2(head_dim)
    block_n, stages = fit_kv_tiles(block_m, block_n, stages, block_d, elem_bytes, smem_bytes)
    return _PrefillConfig(block_m, block_n, warps, stages)


def kv_tiles_bytes(block_m: int, block_n: int, stages: int, block_d: int, elem_bytes: int) -> int:
    """Shared memory of a flash-attention loop: ``stages`` K and V tiles in flight, one Q tile."""
    return (2 * stages * block_n + block_m) * block_d * elem_bytes


def fit_kv_tiles(
    block_m: int, block_n: int, stages: int, block_d: int, elem_bytes: int, smem_bytes: int
) -> tuple[int, int]:
    """``(block_n, stages)`` shrunk until the tiles fit ``smem_bytes`` less Triton's scratch.

    The tuned bf16/fp16 tiles fit every Hopper GPU as they are; wider elements (float32) or
    smaller shared memories first halve the keys per tile (down to 16, tl.dot's minimum), then
    drop pipeline stages.
    """
    budget = smem_bytes - _SMEM_RESERVE_BYTES
    while block_n > 16 and kv_tiles_bytes(block_m, block_n, stages, block_d, elem_bytes) > budget:
        block_n //= 2
    while stages > 1 and kv_tiles_bytes(block_m, block_n, stages, block_d, elem_bytes) > budget:
        stages -= 1
    return block_n, stages


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
    tree_num_nodes: torch.Tensor | None = None,
    tree_visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV cache, optionally
    with draft trees; ``[T, Hq, D]`` in q's dtype (into ``out`` when given).

    q: ``[T, Hq, D]``, the new tokens of B sequences packed; query ``i`` of sequence ``b`` sits
    at position ``seq_lens[b] - q_len_b + i`` and attends to the keys up to it. The caches
    (``[num_blocks, block_size, Hkv, D]``, q's dtype or float8_e4m3fn with ``kv_scale``)
    already hold the new tokens' keys and values; ``Hq`` is a multiple of ``Hkv``.
    block_tables ``[B, max_blocks]``, query_start_loc ``[B+1]`` (cumulative query lengths) and
    seq_lens ``[B]`` (context lengths including the new tokens) are int32; ``max_query_len``
    bounds the query lengths. Draft trees (both or neither): ``tree_num_nodes [B]`` int32 (how
    many of a sequence's last tokens are nodes) and ``tree_visible [T]`` int64 (module
    docstring).
    """
    _check_inputs(q, k_cache, v_cache, kv_scale)
    _check_tree_inputs(q, seq_lens, tree_num_nodes, tree_visible)
    has_tree = tree_num_nodes is not None
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = _output_buffer(q, out)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0 or max_query_len <= 0:
        return out
    groups = num_heads // num_kv_heads
    cfg = _prefill_config(
        head_dim, max_query_len, groups, q.element_size(), shared_memory_bytes(q.device)
    )
    tokens_per_tile = cfg.block_m // groups
    grid = (num_kv_heads, triton.cdiv(max_query_len, tokens_per_tile), batch)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        _scale_arg(k_cache, kv_scale),
        tree_num_nodes if has_tree else q,  # any pointer without trees (unread)
        tree_visible if has_tree else q,
        *_strides(q, out, k_cache, v_cache, block_tables),
        scale * _LOG2E,
        NUM_GROUPS=groups,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        KV_FP8=k_cache.dtype == _FP8_KV,
        HAS_TREE=has_tree,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


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


def _strides(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             block_tables: torch.Tensor) -> tuple[int, ...]:  # fmt: skip
    """Both kernels' stride arguments, in their order."""
    return (*q.stride()[:2], *out.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_tables.stride(0))  # fmt: skip


def _scale_arg(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """The kernels' ``kv_scale_ptr``: the scales, or any pointer for a float cache (unread)."""
    return kv_scale if kv_scale is not None and k_cache.dtype == _FP8_KV else k_cache


def _no_rope_args(q: torch.Tensor) -> tuple:
    return (q, q, 0, 0, 0, 0, q, q, 0, 0, q, q)


def decode_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = _DEFAULT_SMS
) -> int:
    """How many context splits decode uses so that ``batch * num_kv_heads * splits`` fills the GPU."""
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
    """
    _check_inputs(q, k_cache, v_cache, kv_scale)
    if rope is not None:
        rope.check(q, k_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    groups = num_heads // num_kv_heads
    out = _output_buffer(q, out)
    if batch == 0:
        return out
    cfg = _decode_config(head_dim, groups, q.element_size(), shared_memory_bytes(q.device))
    block_d, block_n = triton.next_power_of_2(head_dim), cfg.block_n
    max_seq_len = max(int(max_seq_len), 1)
    num_splits = decode_num_splits(batch, num_kv_heads, max_seq_len, _device_sms(q.device))
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
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        counters,
        block_tables,
        seq_lens,
        _scale_arg(k_cache, kv_scale),
        *_strides(q, out, k_cache, v_cache, block_tables),
        scale * _LOG2E,
        split_len,
        num_splits,
        *(rope.kernel_args() if rope is not None else _no_rope_args(q)),
        NUM_GROUPS=groups,
        BLOCK_G=cfg.block_g,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        DOT_PRECISION=_dot_precision(q.dtype),
        ROPE=rope is not None,
        KV_FP8=k_cache.dtype == _FP8_KV,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **_float32_options(q),
        **pdl_launch(q, pdl),
    )
    return out


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
    size = _DECODE_PROGRAMS_PER_SM * _device_sms(torch.device(device))
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
