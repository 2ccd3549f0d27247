"""Paged attention with draft trees (speculative decoding), in Triton.

The prefill kernel's attention (packed variable-length queries over each sequence's paged KV
cache, online softmax in float32, base 2) with one more mask: the last ``tree_num_nodes[b]``
tokens of sequence ``b`` are the nodes of a draft tree, and a node attends to the context
before the tree and to the nodes its ``tree_visible`` bitmask names (its ancestors and itself,
bit ``j`` for node ``j``; int64, so at most 64 nodes). Queries before the tree (prompt chunks,
the last known token) are causal as in any step. Twin: ``paged_tree_attention_ref``.

CPU tensors work only under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from parallm.kernels.paged_attention import fit_kv_tiles, shared_memory_bytes
from parallm.kernels.rope_store import check_kv_scale, load_kv_scales

_LOG2E = math.log2(math.e)
_FP8_KV = torch.float8_e4m3fn
_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, _FP8_KV)


@triton.jit
def _tree_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    tree_num_nodes_ptr,
    tree_visible_ptr,
    kv_scale_ptr,
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
):
    # A tile's BLOCK_M rows are BLOCK_T tokens x the NUM_GROUPS query heads of one KV head
    # (token-major), so each K/V tile is loaded once for all the query heads that read it.
    BLOCK_T: tl.constexpr = BLOCK_M // NUM_GROUPS
    kv_head = tl.program_id(0)
    m_block = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_T >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len
    tree_start = seq_len - tl.load(tree_num_nodes_ptr + seq)

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
    # Each row's visible tree nodes; rows before the tree never reach a node key (causality).
    visible_nodes = tl.load(tree_visible_ptr + q_rows, mask=row_valid, other=0).to(tl.int64)

    # Keys past the tile's last query position are invisible to every row; keys before both
    # its first query position and the tree are visible to every row: only later tiles mask.
    kv_end = tl.minimum(seq_len, prefix_len + (m_block + 1) * BLOCK_T)
    unmasked_end = tl.minimum(prefix_len + m_block * BLOCK_T, tree_start)
    # An fp8 cache holds k / k_scale and v / v_scale: k_scale joins the softmax scale,
    # v_scale multiplies the output.
    k_scale, v_scale = load_kv_scales(kv_scale_ptr, KV_FP8)
    qk_scale = qk_scale * k_scale

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
        k_ptrs = (k_ptr + pages[:, None] * stride_kb + in_page[:, None] * stride_kt
                  + kv_head * stride_kh + offs_d[None, :])  # fmt: skip
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(q.dtype)  # exact for e4m3
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if start_n + BLOCK_N > unmasked_end:
            node = offs_n - tree_start  # the key's node index, negative before the tree
            shift = tl.minimum(tl.maximum(node, 0), 63).to(tl.int64)
            bit = (visible_nodes[:, None] >> shift[None, :]) & 1
            in_tree = (node[None, :] < 0) | (bit != 0)
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :] & in_tree
            qk = tl.where(visible, qk, float("-inf"))

        # A node may see no key of a whole tile (a tree from key 0 whose ancestors are all
        # later): subtract 0 then, not -inf, so that the tile adds nothing instead of NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = (v_ptr + pages[:, None] * stride_vb + in_page[:, None] * stride_vt
                  + kv_head * stride_vh + offs_d[None, :])  # fmt: skip
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if KV_FP8:
        acc = acc * v_scale
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    tree_num_nodes: torch.Tensor,
    tree_visible: torch.Tensor,
    kv_scale: torch.Tensor | None,
) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k/v cache shapes differ or are not 4-D: {k_cache.shape}, {v_cache.shape}"
        )
    if k_cache.dtype not in _KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"KV caches must be one of {_KV_DTYPES}, got {k_cache.dtype}")
    check_kv_scale(k_cache, kv_scale)
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    page_size = k_cache.shape[1]
    if page_size & (page_size - 1):
        raise ValueError(f"block_size must be a power of two, got {page_size}")
    if tree_num_nodes.shape != seq_lens.shape or tree_visible.shape != q.shape[:1]:
        raise ValueError(
            f"tree_num_nodes must be [B] = {tuple(seq_lens.shape)} and tree_visible [T] = "
            f"{tuple(q.shape[:1])}, got {tuple(tree_num_nodes.shape)} and "
            f"{tuple(tree_visible.shape)}"
        )
    if tree_visible.dtype != torch.int64:
        raise ValueError(f"tree_visible must be int64 bitmasks, got {tree_visible.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dim")


def _tiles(head_dim: int, max_query_len: int, groups: int, q: torch.Tensor) -> tuple[int, ...]:
    """``(block_m, block_n, num_warps, num_stages)``: tree steps carry short queries (a known
    token and at most 64 nodes) next to any prompt chunks of the same step."""
    block_m = min(128, max(16, triton.next_power_of_2(max(max_query_len, 1) * groups)))
    block_m = max(block_m, triton.next_power_of_2(groups))
    block_n = 64 if head_dim <= 128 else 32
    block_d = triton.next_power_of_2(head_dim)
    smem = shared_memory_bytes(q.device)
    block_n, stages = fit_kv_tiles(block_m, block_n, 2, block_d, q.element_size(), smem)
    return block_m, block_n, 4 if block_m <= 64 else 8, stages


def paged_tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    tree_num_nodes: torch.Tensor,
    tree_visible: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``paged_prefill_attention`` with draft trees.

    Args:
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale:
            as ``paged_prefill_attention`` (the new tokens' keys/values already written).
        tree_num_nodes: ``[B]`` int32: how many of sequence ``b``'s last tokens are tree nodes
            (0: none, a causal sequence).
        tree_visible: ``[T]`` int64: for each node query, the bitmask of its sequence's nodes
            it sees (its ancestors and itself); ignored for other queries.
        out: optional ``[T, Hq, D]`` buffer (contiguous in D).
        kv_scale: ``[k_scale, v_scale]`` float32 of an fp8 cache (ignored for a float one).

    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    _check_inputs(q, k_cache, v_cache, seq_lens, tree_num_nodes, tree_visible, kv_scale)
    fp8 = k_cache.dtype == _FP8_KV
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0 or max_query_len <= 0:
        return out
    groups = num_heads // num_kv_heads
    block_m, block_n, warps, stages = _tiles(head_dim, max_query_len, groups, q)
    grid = (num_kv_heads, triton.cdiv(max_query_len, block_m // groups), batch)
    _tree_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, tree_num_nodes,
        tree_visible, kv_scale if fp8 else q, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        scale * _LOG2E,
        NUM_GROUPS=groups, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=fp8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
