"""Paged prefill attention in Triton: packed variable-length queries over their sequences'
paged KV cache, causal, optionally with draft trees (speculative decoding's verify step).

Draft trees: the last ``tree_num_nodes[b]`` tokens of sequence ``b`` are the nodes of a draft
tree, and a node attends to the context before the tree and to the nodes its
``tree_visible`` bitmask names (its ancestors and itself, bit ``j`` for node ``j``; int64, so
at most 64 nodes). Queries before the tree are causal as in any step.

The cache layout, fp8 scales and shared-memory fitting are ``paged_kv``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from parallm.kernels.paged_kv import (
    FP8_KV,
    LOG2E,
    check_paged_inputs,
    dot_precision,
    fit_kv_tiles,
    kernel_strides,
    kv_scale_arg,
    output_buffer,
    page_rows,
    shared_memory_bytes,
)
from parallm.kernels.rope_store import load_kv_scales


@triton.jit
def _tree_visible(offs_n, tree_start, visible_nodes):
    """``[M, N]``: which keys the tree mask lets each row see: every key before the tree, and
    node ``j`` where bit ``j`` of the row's ``visible_nodes`` is set."""
    node = offs_n - tree_start  # the key's node index, negative before the tree
    shift = tl.minimum(tl.maximum(node, 0), 63).to(tl.int64)
    bit = (visible_nodes[:, None] >> shift[None, :]) & 1
    return (node[None, :] < 0) | (bit != 0)


# The block table's width follows the longest sequence of the step: specialized (== 1, a
# multiple of 16), each new width class would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["stride_bt"])
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
    tile_seq_ptr,
    tile_block_ptr,
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
    TILE_TABLE: tl.constexpr,
):
    # A tile's BLOCK_M rows are BLOCK_T tokens x the NUM_GROUPS query heads of one KV head
    # (token-major), so each K/V tile is loaded once for all the query heads that read it.
    BLOCK_T: tl.constexpr = BLOCK_M // NUM_GROUPS
    kv_head = tl.program_id(0)
    if TILE_TABLE:  # the grid is fixed (a captured graph); the table names each tile's work
        seq = tl.load(tile_seq_ptr + tl.program_id(1))
        if seq < 0:
            return
        m_block = tl.load(tile_block_ptr + tl.program_id(1))
    else:
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
        k_ptrs = page_rows(k_ptr, pages, in_page, kv_head, stride_kb, stride_kt, stride_kh, offs_d)
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
        v_ptrs = page_rows(v_ptr, pages, in_page, kv_head, stride_vb, stride_vt, stride_vh, offs_d)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if KV_FP8:
        acc = acc * v_scale
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


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
    tiles: torch.Tensor | None = None,
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

    ``tiles``: ``[2, N]`` int32 from ``prefill_tiles``, for a launch whose grid must not
    depend on the step (a CUDA graph captured once for many steps): N query tiles, row 0 each
    tile's sequence (-1: no work) and row 1 its tile index in that sequence, in tiles of
    ``prefill_tokens_per_tile(...)`` tokens for the same ``max_query_len``.
    """
    check_paged_inputs(q, k_cache, v_cache, kv_scale)
    _check_tree_inputs(q, seq_lens, tree_num_nodes, tree_visible)
    has_tree = tree_num_nodes is not None
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = output_buffer(q, out)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0 or max_query_len <= 0:
        return out
    groups = num_heads // num_kv_heads
    cfg = _prefill_config(
        head_dim, max_query_len, groups, q.element_size(), shared_memory_bytes(q.device)
    )
    if tiles is None:
        grid = (num_kv_heads, triton.cdiv(max_query_len, cfg.block_m // groups), batch)
    else:
        _check_tiles(tiles)
        grid = (num_kv_heads, tiles.shape[1], 1)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        kv_scale_arg(k_cache, kv_scale),
        tree_num_nodes if has_tree else q,  # any pointer without trees (unread)
        tree_visible if has_tree else q,
        tiles[0] if tiles is not None else q,  # any pointer without a table (unread)
        tiles[1] if tiles is not None else q,
        *kernel_strides(q, out, k_cache, v_cache, block_tables),
        scale * LOG2E,
        NUM_GROUPS=groups,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        KV_FP8=k_cache.dtype == FP8_KV,
        HAS_TREE=has_tree,
        TILE_TABLE=tiles is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _check_tiles(tiles: torch.Tensor) -> None:
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[0] != 2:
        raise ValueError(f"tiles must be a [2, N] int32 table (prefill_tiles), got "
                         f"{tuple(tiles.shape)} {tiles.dtype}")  # fmt: skip


def prefill_tokens_per_tile(
    head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
    max_query_len: int,
) -> int:  # fmt: skip
    """Query tokens a tile of ``paged_prefill_attention`` covers for queries of this shape
    and dtype on ``device`` with ``max_query_len``: what ``prefill_tiles`` must cut by."""
    groups = num_heads // num_kv_heads
    elem_bytes = torch.empty(0, dtype=dtype).element_size()
    cfg = _prefill_config(head_dim, max_query_len, groups, elem_bytes,
                          shared_memory_bytes(device))  # fmt: skip
    return cfg.block_m // groups


def prefill_tiles(
    query_lens: np.ndarray, tokens_per_tile: int, num_tiles: int,
    seq_lens: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """``[2, num_tiles]`` int32: the query tiles of sequences with ``query_lens`` new tokens
    (row 0 the sequence, row 1 the tile's index in it), the tiles that see the most keys
    first (started first, they finish with the rest), then ``-1`` rows (no work). A tile sees
    its sequence's cached keys (``seq_lens`` minus the query, none where ``seq_lens`` is not
    given) and its query's up to its last row. ValueError when the step needs more than
    ``num_tiles`` tiles."""
    lens = np.asarray(query_lens, dtype=np.int64)
    counts = -(-lens // tokens_per_tile)
    if counts.sum() > num_tiles:
        raise ValueError(f"the step needs {int(counts.sum())} query tiles of {tokens_per_tile} "
                         f"tokens; the table holds {num_tiles}")  # fmt: skip
    seqs = np.repeat(np.arange(len(counts)), counts)
    blocks = np.arange(len(seqs)) - np.repeat(np.cumsum(counts) - counts, counts)
    cached = 0 if seq_lens is None else (np.asarray(seq_lens, dtype=np.int64) - lens)[seqs]
    keys = cached + np.minimum((blocks + 1) * tokens_per_tile, lens[seqs])
    order = np.argsort(-keys, kind="stable")
    table = np.full((2, num_tiles), -1, dtype=np.int32)
    table[0, : len(seqs)] = seqs[order]
    table[1, : len(seqs)] = blocks[order]
    return table


def split_prefill_tiles(
    query_lens: np.ndarray, tokens_per_tile: int, short_tokens: int, num_tiles: int,
    seq_lens: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Two ``prefill_tiles`` tables for one step, launched one after the other into the same
    output: the sequences of more than ``short_tokens`` new tokens cut by ``tokens_per_tile``,
    and the others (decode rows, short drafts) cut by ``short_tokens``, the tile of the
    kernel's smallest row count (``prefill_tokens_per_tile(..., max_query_len=1)``).

    Why: a launch's row tile is sized by its longest query, so a decode row beside a prompt
    chunk had a whole 128-row tile to itself and paid 128 rows of dot products over its whole
    context; at long contexts and hundreds of decode rows that was most of a mixed step."""
    lens = np.asarray(query_lens, dtype=np.int64)
    short = lens <= short_tokens
    return (prefill_tiles(np.where(short, 0, lens), tokens_per_tile, num_tiles, seq_lens),
            prefill_tiles(np.where(short, lens, 0), short_tokens, num_tiles, seq_lens))  # fmt: skip
