"""PyTorch twins of the Triton kernels in this package: the same arguments, the same results.

Each ``<kernel>_ref`` states what ``<kernel>`` computes, in plain PyTorch on any device; the
kernel tests compare the two on random inputs. The twins of the elementwise kernels (norms,
SiLU-and-mul, rotary) round where PyTorch's unfused ops round, as the kernels do. The others
compute in float32 (float64 when given float64 inputs: the exact answer the attention tests
compare against) and return the kernel's output dtype. No Triton import here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from parallm.layers.activation import silu_and_mul as silu_and_mul_ref
from parallm.layers.norm import rms_norm as rms_norm_ref
from parallm.layers.rotary import RopeTables

if TYPE_CHECKING:  # importing it pulls in triton
    from parallm.kernels.rope_store import NewTokenRope


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a twin computes in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# fp8 KV cache: float8 e4m3 values with per-layer float32 scales ``kv_scale = [k_scale,
# v_scale]``; a cached value stands for ``value * scale``.

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # e4m3fn's largest finite value; it has no inf, and 480 and up are NaN


def is_fp8_kv(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in float32, clamped to +-448, rounded to the nearest e4m3 (ties to even).

    The error is at most 2^-4 of ``|x|`` where ``2^-6 <= |x / scale| <= 448`` (3 mantissa
    bits) and at most ``2^-10 * scale`` below that (subnormals); NaN stays NaN.
    """
    return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv_ref(
    x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Cached values as ``dtype``: fp8 ones times their scale (in ``dtype``), others cast (a
    float cache has no scale)."""
    return x.to(dtype) * scale.to(dtype) if is_fp8_kv(x) else x.to(dtype)


def _kv_scales(
    kv_scale: torch.Tensor | None, cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_scale is None:
        if is_fp8_kv(cache):
            raise ValueError("an fp8 KV cache needs kv_scale ([k_scale, v_scale] float32)")
        kv_scale = torch.ones(2, device=cache.device)
    return kv_scale[0], kv_scale[1]


# Attention (parallm.kernels.paged_prefill, parallm.kernels.paged_decode)


def tree_mask_ref(
    visible: torch.Tensor, num_nodes: torch.Tensor | int, seq_len: int
) -> torch.Tensor:
    """Bool ``[q_len, seq_len]``: which keys the tree mask lets each of a sequence's queries see.

    The sequence's last ``num_nodes`` keys are draft-tree nodes; a key before them is
    visible, node ``j`` only to the queries whose ``visible`` bitmask (int64 ``[q_len]``) has
    bit ``j``. Causality is the caller's: AND it with the causal mask.
    """
    keys = torch.arange(seq_len, device=visible.device)
    node = keys - (seq_len - num_nodes)  # the key's node index; negative before the tree
    bits = (visible[:, None] >> node.clamp(0, 63)[None, :]) & 1
    return (node < 0)[None, :] | (bits == 1)


def _context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, groups: int,
             scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``[Hq, seq_len, D]``: one sequence's cached keys (or values) in ``dtype``, read through
    its block table and repeated for the query heads of each KV head."""
    pages = block_table[: -(-seq_len // cache.shape[1])].long()
    cached = dequantize_kv_ref(cache[pages].flatten(0, 1)[:seq_len], scale, dtype)
    return cached.repeat_interleave(groups, dim=1).transpose(0, 1)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
    kv_scale: torch.Tensor | None,
    tree_num_nodes: torch.Tensor | None,
    tree_visible: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Causal attention of packed queries over their paged context, one sequence at a time in
    ``dtype``: ``paged_prefill_attention_ref`` and the reference attention backend."""
    k_scale, v_scale = _kv_scales(kv_scale, k_cache)
    groups = q.shape[1] // k_cache.shape[2]
    out = torch.zeros_like(q)
    for b, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[b], query_start_loc[b + 1]
        if start == end:
            continue
        keys = _context(k_cache, block_tables[b], seq_len, groups, k_scale, dtype)
        values = _context(v_cache, block_tables[b], seq_len, groups, v_scale, dtype)
        # Query i sits at position seq_len - q_len + i and sees the keys up to itself.
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        if tree_num_nodes is not None:
            mask &= tree_mask_ref(tree_visible[start:end], tree_num_nodes[b], seq_len)
        query = q[start:end].to(dtype).transpose(0, 1)
        attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
        out[start:end] = attn.transpose(0, 1).to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    kv_scale: torch.Tensor | None = None,
    tree_num_nodes: torch.Tensor | None = None,
    tree_visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """``paged_prefill_attention`` (its arguments; ``max_query_len`` is unused), in float32 or
    float64 for float64 inputs. A node query of a draft tree sees the context before the tree
    and the nodes of its ``tree_visible`` bitmask (:func:`tree_mask_ref`)."""
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, query_start_loc.tolist(), seq_lens.tolist(), scale,
        kv_scale, tree_num_nodes, tree_visible, _wide(q.dtype),
    )  # fmt: skip


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    *,
    rope: NewTokenRope | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence at position ``seq_lens[b] - 1`` (``paged_decode_attention``).

    With ``rope``, q is the raw query: q and the new k are rotated and the new k and v stored
    at their slots (negative: not stored) before attending, as the kernel does.
    """
    if rope is not None:
        q, k = apply_rotary_ref(q, rope.k, rope.cos_cache, rope.sin_cache, rope.positions)
        _store_kv(k, rope.v, (k_cache, v_cache), rope.slot_mapping, kv_scale)
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, 1, scale, kv_scale=kv_scale
    )


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Store new keys and values at their slots of ``kv_cache`` (``[2, blocks, block_size, Hkv,
    D]``, or the k and v caches); an fp8 cache stores them quantized with ``kv_scale``."""
    for i, (cache, x) in enumerate(((kv_cache[0], k), (kv_cache[1], v))):
        if is_fp8_kv(cache):
            x = quantize_kv_ref(x, _kv_scales(kv_scale, cache)[i])
            # index_copy_ has no float8 kernels on every device: copy the bytes.
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, *cache.shape[-2:]).index_copy_(0, slots, x.to(cache.dtype))


def _store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor, kv_scale: torch.Tensor | None,
) -> None:  # fmt: skip
    """:func:`write_kv` of the tokens whose slot is not negative (the kernels skip those)."""
    live = slots >= 0
    write_kv(k[live], v[live], kv_cache, slots[live].long(), kv_scale)


# Norms, SiLU-and-mul, rotary (parallm.kernels.elementwise, parallm.kernels.rope_store)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``, the sum in x's dtype (``fused_add_rms_norm``)."""
    summed = residual + x
    return rms_norm_ref(summed, weight, eps), summed


def apply_rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [T, Hq, D] and k [T, Hk, D] at ``positions``, as the model does."""
    return RopeTables(positions, cos_cache, sin_cache).apply(q, k)


def rotary_and_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k, store the rotated k and v at ``slot_mapping`` of ``kv_cache``
    ``[2, blocks, block_size, Hkv, D]`` (negative slots store nothing; an fp8 cache quantizes
    with ``kv_scale``); returns the rotated q (``rotary_and_store_kv``)."""
    q_rot, k_rot = apply_rotary_ref(q, k, cos_cache, sin_cache, positions)
    _store_kv(k_rot, v, kv_cache, slot_mapping, kv_scale)
    return q_rot


# One-row GEMVs (parallm.kernels.gemv)


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T`` summed in float32, each output times its row's ``weight_scale`` (a
    quantized weight), rounded once to x's dtype (``gemv``)."""
    wide = _wide(x.dtype)
    y = F.linear(x.to(wide), weight.to(wide))
    if weight_scale is not None:
        y = y * weight_scale.to(wide)
    return y.to(x.dtype)


def rms_norm_gemv_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gather_ids: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rms_norm(x + residual) @ weight.T, x + residual)`` for one row (``rms_norm_gemv``).

    With ``gather_ids``, x is a table and the row is ``x[gather_ids[0]]``, returned second.
    Without a residual or ``gather_ids`` the second result is None.
    """
    row = x[gather_ids.long()] if gather_ids is not None else x
    if residual is not None:
        normed, stored = fused_add_rms_norm_ref(row, residual, norm_weight, eps)
    else:
        normed, stored = rms_norm_ref(row, norm_weight, eps), None
    if gather_ids is not None:
        stored = row
    return gemv_ref(normed.to(x.dtype), weight, weight_scale), stored


def silu_mul_gemv_ref(
    gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` for one row ``[1, 2K]`` (``silu_mul_gemv``)."""
    return gemv_ref(silu_and_mul_ref(gate_up), weight, weight_scale)


# Greedy sampling (parallm.kernels.argmax)


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum, NaN counted as +inf (``triton_argmax``); int64 ``[rows]``."""
    x = logits.float()
    return torch.where(x.isnan(), float("inf"), x).argmax(dim=-1)


def prompt_lookup_ref(
    tokens: torch.Tensor, lengths: torch.Tensor, num_tokens: int, min_n: int, max_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt_lookup``'s twin, row by row: the longest n in ``[min_n, max_n]`` whose suffix
    recurs wholly before the last token, its latest occurrence, and ``num_tokens`` of what
    followed it, repeated with that period where the row ends first; ``(drafts [B,
    num_tokens] int32, 0 past each count; counts [B] int32)``."""
    rows = tokens.shape[0]
    drafts = torch.zeros((rows, num_tokens), dtype=torch.int32)
    counts = torch.zeros((rows,), dtype=torch.int32)
    for b in range(rows):
        size = int(lengths[b])
        row = tokens[b, :size].cpu()
        for n in range(min(max_n, size - 1), min_n - 1, -1):
            windows = row[: size - 1].unfold(0, n, 1)  # every n-gram ending before the last token
            hits = (windows == row[size - n :]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                follow = row[start:size]
                drafts[b] = follow[torch.arange(num_tokens) % len(follow)]
                counts[b] = num_tokens
                break
    return drafts, counts


def history_lookup_ref(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    ring: torch.Tensor,
    state: torch.Tensor,
    drafts: torch.Tensor,
    counts: torch.Tensor,
    num_tokens: int,
    min_n: int,
    max_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``history_lookup``'s twin (same arguments, same in-place updates), row by row: for each
    row whose count is 0, the ring's sequences laid out oldest first (the base ``[0, start)``,
    ``[fill, used)``, then ``[start, fill)``; each ends with a separator, -1), the longest n in
    ``[min_n, max_n]`` whose suffix occurs there followed by a token other than -1, its last
    occurrence, and up to ``num_tokens`` tokens after it, stopping before a -1."""
    fill, used, start = (int(v) for v in state.cpu())
    ring = ring.cpu()
    laid = torch.cat([ring[:start], ring[fill:used], ring[start:fill]])
    for b in range(tokens.shape[0]):
        if int(counts[b]) != 0:
            continue
        drafts[b] = 0
        size = int(lengths[b])
        row = tokens[b, :size].cpu()
        for n in range(min(max_n, size), min_n - 1, -1):
            if len(laid) <= n:
                continue
            windows = laid[:-1].unfold(0, n, 1)  # every n-gram with a token after it
            after = laid[n:]
            hits = ((windows == row[size - n :]).all(dim=1) & (after != -1)).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                follow = laid[start : start + num_tokens]
                stop = (follow == -1).nonzero()
                count = int(stop[0]) if len(stop) else len(follow)
                drafts[b, :count] = follow[:count]
                counts[b] = count
                break
    return drafts, counts


def greedy_accept_ref(
    argmax_rows: torch.Tensor,
    step_ids: torch.Tensor,
    counts: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """``greedy_accept``'s twin, sequence by sequence (same arguments, same in-place updates)."""
    rows = lengths.shape[0]
    q = argmax_rows.numel() // rows
    accepted = torch.zeros((rows,), dtype=torch.int32)
    for b in range(rows):
        best = argmax_rows[b * q : (b + 1) * q].tolist()
        ids = step_ids[b * q : (b + 1) * q].tolist()
        a = 0
        while a < int(counts[b]) and best[a] == ids[a + 1]:
            a += 1
        size, width = int(lengths[b]), tokens.shape[1]
        emitted = best[: a + 1][: max(0, width - size)]
        tokens[b, size : size + len(emitted)] = torch.tensor(emitted, dtype=torch.int32)
        lengths[b] = min(size + a + 1, width)
        accepted[b] = a
    return accepted


def stage_chain_step_ref(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    drafts: torch.Tensor,
    counts: torch.Tensor,
    block_tables: torch.Tensor,
    out: dict[str, torch.Tensor],
    block_size: int,
    scratch_slot: int,
) -> None:
    """``stage_chain_step``'s twin, sequence by sequence (same arguments, writes ``out``)."""
    size = block_tables.shape[0]
    q = out["input_ids"].numel() // size
    for b in range(lengths.shape[0]):
        length, count = int(lengths[b]), int(counts[b])
        for j in range(q):
            row = b * q + j
            real = j <= count
            position = length - 1 + j if real else 0
            token = int(tokens[b, length - 1]) if j == 0 else int(drafts[b, j - 1]) if real else 0
            block = int(block_tables[b, position // block_size])
            slot = block * block_size + position % block_size if real else scratch_slot
            out["input_ids"][row] = token
            out["positions"][row] = position
            out["slot_mapping"][row] = slot
            out["sample_rows"][row] = row
        out["seq_lens"][b] = length - 1 + q
