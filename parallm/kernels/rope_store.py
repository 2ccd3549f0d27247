"""Rotary embedding fused with the paged KV-cache store: one launch per layer and step.

Each token's q is rotated into the output, and its rotated k and its v go straight to
``slot_mapping[t]`` of the cache. The rotation rounds exactly as PyTorch's rotary does, so the
cache ends up bit for bit as ``rotary_and_store_kv_ref`` leaves it. An fp8 cache
(``torch.float8_e4m3fn``) stores ``x / scale`` clamped to +-448 and rounded to the nearest e4m3
value, with the layer's ``kv_scale = [k_scale, v_scale]`` (float32), as ``quantize_kv_ref``
does; the rotation still rounds to the model's dtype first.

No host synchronisation, so it can be captured in a CUDA graph. CPU tensors work only under
the Triton interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parallm.kernels.elementwise import _NO_FMA, _round_to

# Each program covers up to this many (head, dim-pair) elements.
_TILE = 2048
_FP8_KV = torch.float8_e4m3fn
_E4M3_MAX = tl.constexpr(448.0)
_E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)
# Adding 2^14 to a float32 below 2^-6 rounds it to a multiple of 2^-9, e4m3's subnormal step
# (float32's ulp at 2^14), to nearest even; subtracting it again is exact.
_E4M3_SUBNORMAL_SHIFTER = tl.constexpr(2.0**14)


# fp8 (e4m3) cache elements.


@triton.jit
def _round_to_e4m3(x):
    """float32 ``x`` with ``|x| <= 448`` rounded to the nearest e4m3 value (ties to even), as
    float32. By hand, as ``_round_to`` rounds to bfloat16: the Triton interpreter's float32 to
    fp8 cast does not round to nearest, and a value already on e4m3's grid casts exactly."""
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    # Normals: keep 3 of float32's 23 mantissa bits, nearest-even (a carry bumps the exponent).
    normal = ((bits + (0x7FFFF + ((bits >> 20) & 1))) >> 20 << 20).to(tl.float32, bitcast=True)
    subnormal = (ax + _E4M3_SUBNORMAL_SHIFTER) - _E4M3_SUBNORMAL_SHIFTER
    rounded = tl.where(ax < _E4M3_MIN_NORMAL, subnormal, normal)
    # x's sign bit put back by bit operations: compiled for a GPU, ``-rounded`` becomes
    # ``0 - rounded``, which turns a negative value that rounds to zero into +0.0, where
    # PyTorch's cast gives -0.0.
    sign = x.to(tl.int32, bitcast=True) >> 31 << 31
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def to_cache(x, scale, dtype: tl.constexpr):
    """float32 ``x`` (already rounded to the model's dtype) as a ``dtype`` cache element: for
    e4m3, ``x / scale`` clamped to +-448 (never inf: NaN stays NaN) and rounded to nearest."""
    if dtype == tl.float8e4nv:
        scaled = tl.math.div_rn(x, scale)
        clamped = tl.clamp(scaled, -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
        y = _round_to_e4m3(clamped).to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def load_kv_scales(kv_scale_ptr, KV_FP8: tl.constexpr):
    """``(k_scale, v_scale)`` of an fp8 cache (float32), ones for a float cache."""
    if KV_FP8:
        k_scale = tl.load(kv_scale_ptr).to(tl.float32)
        v_scale = tl.load(kv_scale_ptr + 1).to(tl.float32)
    else:
        k_scale = 1.0
        v_scale = 1.0
    return k_scale, v_scale


# Rotary helpers, rounding as ``RotaryEmbedding`` does in PyTorch.


@triton.jit
def _load_cos_sin(row_ptr, d, dmask, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """Both halves of one cache row, cast to DTYPE as RotaryEmbedding casts them."""
    lo = tl.load(row_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    hi = tl.load(row_ptr + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    return _round_to(lo, DTYPE), _round_to(hi, DTYPE)


@triton.jit
def _rope_heads(
    in_row,
    out_row,
    stride_in_h,
    stride_out_h,
    head0,
    num_heads,
    c1,
    c2,
    s1,
    s2,
    d,
    dmask,
    scale,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    dtype: tl.constexpr,
):
    """Heads [head0, head0 + BLOCK_H) of one token: x * cos + rotate_half(x) * sin, rounded to
    ``dtype`` (the model's) and stored as ``to_cache`` makes them (``scale``: fp8 only).

    c1/s1 are the cos/sin of the first half of the dims, c2/s2 of the second, already
    rounded to ``dtype``.
    """
    h = head0 + tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & dmask[None, :]
    in_offs = h[:, None] * stride_in_h + d[None, :]
    out_offs = h[:, None] * stride_out_h + d[None, :]
    x1 = tl.load(in_row + in_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_row + in_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    out_dtype: tl.constexpr = out_row.dtype.element_ty
    # Each product, then the sum, is rounded to the dtype, as PyTorch's separate kernels do.
    # rotate_half(x) = [-x2, x1]; rounding commutes with negation.
    a1 = _round_to(x1 * c1[None, :], dtype)
    b1 = _round_to(x2 * s1[None, :], dtype)
    a2 = _round_to(x2 * c2[None, :], dtype)
    b2 = _round_to(x1 * s2[None, :], dtype)
    y1, y2 = _round_to(a1 - b1, dtype), _round_to(a2 + b2, dtype)
    tl.store(out_row + out_offs, to_cache(y1, scale, out_dtype), mask=mask)
    tl.store(out_row + out_offs + HALF, to_cache(y2, scale, out_dtype), mask=mask)


def _check_tables(
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    tokens: int,
    head_dim: int,
    prefix: str = "",
) -> None:
    """What both rotary kernels read: the cos/sin tables ``[max_positions, head_dim]`` with
    contiguous rows, and each token's integer position and cache slot."""
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    for name, t in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if t.dim() != 2 or t.shape[1] != head_dim or t.stride(1) != 1:
            raise ValueError(f"{prefix}{name} must be [max_positions, {head_dim}], contiguous")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if tuple(t.shape) != (tokens,) or t.is_floating_point():
            raise ValueError(f"{prefix}{name} must be [{tokens}] integer")


@triton.jit
def _copy_heads(
    in_row,
    out_row,
    stride_in_h,
    stride_out_h,
    head0,
    num_heads,
    d,
    dmask,
    scale,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Heads [head0, head0 + BLOCK_H) of one token, stored as ``to_cache`` makes them (the
    same values in a cache of their dtype; ``scale``: fp8 only)."""
    h = head0 + tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & dmask[None, :]
    in_offs = h[:, None] * stride_in_h + d[None, :]
    out_offs = h[:, None] * stride_out_h + d[None, :]
    out_dtype: tl.constexpr = out_row.dtype.element_ty
    for half in tl.static_range(2):
        x = tl.load(in_row + in_offs + half * HALF, mask=mask).to(tl.float32)
        tl.store(out_row + out_offs + half * HALF, to_cache(x, scale, out_dtype), mask=mask)


@triton.jit
def rope_rows(row_ptr, heads, stride_h, mask, cos_row, sin_row, offs_d, HALF: tl.constexpr,
              dtype: tl.constexpr):  # fmt: skip
    """Rotated heads ``heads`` of one token as a float32 [H, BLOCK_D] tile (values rounded to
    ``dtype`` exactly as ``_rope_heads`` rounds them). rotate_half's partner of dim d is read
    with a second, permuted load, so no register shuffles are needed; the cos/sin rows are in
    the ``cat([f, f])`` layout, so their dim d is the frequency of d mod HALF."""
    offs = heads[:, None] * stride_h + offs_d[None, :]
    partner = heads[:, None] * stride_h + ((offs_d + HALF) % (2 * HALF))[None, :]
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_sw = tl.load(row_ptr + partner, mask=mask, other=0.0).to(tl.float32)
    dmask = offs_d < 2 * HALF
    c = _round_to(tl.load(cos_row + offs_d, mask=dmask, other=0.0).to(tl.float32), dtype)
    s = _round_to(tl.load(sin_row + offs_d, mask=dmask, other=0.0).to(tl.float32), dtype)
    a = _round_to(x * c[None, :], dtype)
    b = _round_to(x_sw * s[None, :], dtype)
    return _round_to(tl.where((offs_d < HALF)[None, :], a - b, a + b), dtype)


@triton.jit
def _rope_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    cache_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    kv_scale_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cache_kv,
    stride_cache_slot,
    stride_cache_h,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_kv_heads,
    num_q_blocks,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # Grid: (tokens, q head blocks + kv head blocks). A kv program stores both k and v of its
    # heads, so the slot is loaded once.
    dtype: tl.constexpr = q_out_ptr.dtype.element_ty
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c1, c2 = _load_cos_sin(cos_ptr + pos * stride_cos, d, dmask, HALF, dtype)
    s1, s2 = _load_cos_sin(sin_ptr + pos * stride_sin, d, dmask, HALF, dtype)
    if hb < num_q_blocks:
        q_row, q_out_row = q_ptr + t * stride_qt, q_out_ptr + t * stride_qot
        _rope_heads(
            q_row, q_out_row, stride_qh, stride_qoh, hb * BLOCK_HQ, num_q_heads, c1, c2, s1, s2,
            d, dmask, 1.0, HALF, BLOCK_HQ, dtype,
        )  # fmt: skip
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        # The engine pads with a scratch block's slot, never a negative one; skipping negatives
        # (vLLM's padding convention) keeps a stray one from writing before the cache.
        if slot >= 0:
            head0 = (hb - num_q_blocks) * BLOCK_HKV
            k_dst = cache_ptr + slot * stride_cache_slot
            k_scale, v_scale = load_kv_scales(kv_scale_ptr, KV_FP8)
            _rope_heads(
                k_ptr + t * stride_kt, k_dst, stride_kh, stride_cache_h, head0, num_kv_heads,
                c1, c2, s1, s2, d, dmask, k_scale, HALF, BLOCK_HKV, dtype,
            )  # fmt: skip
            _copy_heads(
                v_ptr + t * stride_vt, k_dst + stride_cache_kv, stride_vh, stride_cache_h, head0,
                num_kv_heads, d, dmask, v_scale, HALF, BLOCK_HKV,
            )  # fmt: skip


def check_kv_scale(cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An fp8 cache needs its ``[k_scale, v_scale]``: float32, on the cache's device."""
    if cache.dtype != _FP8_KV:
        return
    if kv_scale is None:
        raise ValueError(f"a {_FP8_KV} KV cache needs kv_scale ([k_scale, v_scale] float32)")
    if kv_scale.dtype != torch.float32 or kv_scale.numel() != 2 or not kv_scale.is_contiguous():
        raise ValueError(
            f"kv_scale must be 2 contiguous float32 values [k_scale, v_scale], got "
            f"{kv_scale.dtype} {tuple(kv_scale.shape)}"
        )
    if kv_scale.device != cache.device:
        raise ValueError(f"kv_scale must be on the cache's device {cache.device}")


def _check_store_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    kv_scale: torch.Tensor | None,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError("q and k must be [tokens, heads, head_dim] with the same tokens and D")
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need one dtype and a contiguous head_dim (row strides are fine)")
    if v.shape != k.shape or v.dtype != k.dtype or v.stride(-1) != 1:
        raise ValueError("v must have k's shape and dtype and a contiguous head_dim")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != k.shape[1:]:
        raise ValueError("kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]")
    # The kernel rounds to k's dtype once; a cast to another float dtype would round again.
    if kv_cache.dtype not in (k.dtype, _FP8_KV):
        raise ValueError(
            f"kv_cache must have k's dtype {k.dtype} or {_FP8_KV}, got {kv_cache.dtype}"
        )
    check_kv_scale(kv_cache, kv_scale)
    if kv_cache.stride(-1) != 1 or kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
        raise ValueError("kv_cache needs a contiguous head_dim and blocks laid out as slots")


def rotary_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k (rotate-half RoPE) and store rotated k and v in the paged cache, as the
    PyTorch rotary followed by ``write_kv(k_rot, v, kv_cache, slot_mapping)`` does, bit for bit.

    q: [T, Hq, D]; k, v: [T, Hkv, D], any token/head strides with a contiguous D (views into a
    fused qkv projection work); cos_cache, sin_cache: [max_positions, D] float32; positions:
    [T]; kv_cache: [2, num_blocks, block_size, Hkv, D] in k's dtype, or float8_e4m3fn with
    ``kv_scale``; slot_mapping: [T] slots, each in range (not checked: that would sync with the
    host), negative ones storing nothing. Returns the rotated q: a new contiguous tensor, or
    ``q_out`` (which may be q itself).
    """
    _check_store_inputs(q, k, v, kv_cache, kv_scale)
    tokens, num_q_heads, head_dim = q.shape
    _check_tables(cos_cache, sin_cache, positions, slot_mapping, tokens, head_dim)
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif q_out.shape != q.shape or q_out.dtype != q.dtype or q_out.stride(-1) != 1:
        raise ValueError("q_out must match q's shape and dtype, with a contiguous head_dim")
    num_kv_heads = k.shape[1]
    if tokens == 0:
        return q_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    max_heads = max(1, _TILE // block_half)
    block_hq = min(triton.next_power_of_2(num_q_heads), max_heads)
    block_hkv = min(triton.next_power_of_2(num_kv_heads), max_heads)
    num_q_blocks = triton.cdiv(num_q_heads, block_hq)
    grid = (tokens, num_q_blocks + triton.cdiv(num_kv_heads, block_hkv))
    _rope_store_kernel[grid](
        q, k, v, q_out, kv_cache, cos_cache, sin_cache, positions, slot_mapping,
        kv_scale if kv_scale is not None else cos_cache,  # read for an fp8 cache only
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        cos_cache.stride(0), sin_cache.stride(0),
        num_q_heads, num_kv_heads, num_q_blocks,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_HQ=block_hq,
        BLOCK_HKV=block_hkv,
        KV_FP8=kv_cache.dtype == _FP8_KV,
        num_warps=4,
        **_NO_FMA,
    )  # fmt: skip
    return q_out


@triton.jit
def rope_and_store(
    q_row, kn_ptr, vn_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, seq, kv_head,
    heads, g_valid, d_valid, offs_d, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_cos, stride_sin,
    holds_new_token, k_scale, v_scale, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    dtype: tl.constexpr,
):  # fmt: skip
    """The rotated query heads of this program; stores the new token's k (rotated) and v of
    this KV head when ``holds_new_token`` (as ``rotary_and_store_kv`` does, bit for bit; the
    scales serve an fp8 cache only)."""
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    cos_row, sin_row = cos_ptr + pos * stride_cos, sin_ptr + pos * stride_sin
    q = rope_rows(q_row, heads, stride_qh, g_valid[:, None] & d_valid[None, :], cos_row,
                  sin_row, offs_d, half, dtype)  # fmt: skip
    if holds_new_token:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        if slot >= 0:  # padding rows use a scratch slot; a negative one stores nothing
            one = tl.zeros([1], dtype=tl.int32) + kv_head
            mask = d_valid[None, :]
            k_new = rope_rows(kn_ptr + seq.to(tl.int64) * stride_knb, one, stride_knh, mask,
                              cos_row, sin_row, offs_d, half, dtype)  # fmt: skip
            page, in_page = slot // PAGE_SIZE, slot % PAGE_SIZE
            k_dst = k_ptr + page * stride_kb + in_page * stride_kt + kv_head * stride_kh
            k_new = to_cache(k_new, k_scale, k_ptr.dtype.element_ty)
            tl.store(k_dst + offs_d[None, :], k_new, mask=mask)
            v_src = vn_ptr + seq.to(tl.int64) * stride_vnb + kv_head * stride_vnh + offs_d
            v_dst = v_ptr + page * stride_vb + in_page * stride_vt + kv_head * stride_vh
            v_new = tl.load(v_src, mask=d_valid).to(tl.float32)
            tl.store(v_dst + offs_d, to_cache(v_new, v_scale, v_ptr.dtype.element_ty), mask=d_valid)
        # The loop below reads these stores back from the cache: make them visible to every
        # thread of the program first.
        tl.debug_barrier()
    return q


@dataclass
class NewTokenRope:
    """What the decode kernel needs to rotate q and k and store k and v itself (one kernel
    fewer per layer and step): this step's raw k and v [B, Hkv, D] (views into the fused qkv
    projection work), the rotary cos/sin caches in the ``cat([f, f])`` layout, each
    sequence's position and its new token's cache slot (negative: store nothing)."""

    k: torch.Tensor
    v: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor

    def check(self, q: torch.Tensor, k_cache: torch.Tensor) -> None:
        batch, _, head_dim = q.shape
        want = (batch, k_cache.shape[2], head_dim)
        dtype = q.dtype if k_cache.dtype == _FP8_KV else k_cache.dtype
        for name, t in (("k", self.k), ("v", self.v)):
            if tuple(t.shape) != want or t.dtype != dtype or t.stride(-1) != 1:
                raise ValueError(f"rope.{name} must be {want} in {dtype}, contiguous in D")
        _check_tables(self.cos_cache, self.sin_cache, self.positions, self.slot_mapping, batch,
                      head_dim, prefix="rope.")  # fmt: skip

    def kernel_args(self) -> tuple:
        k, v, cos, sin = self.k, self.v, self.cos_cache, self.sin_cache
        return (k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos, sin,
                cos.stride(0), sin.stride(0), self.positions, self.slot_mapping)  # fmt: skip
