"""Fused Triton kernels for the small per-layer ops of a decoder: RMSNorm (optionally with the
residual add), SiLU-and-mul, and rotary embedding.

Each replaces a chain of PyTorch kernels with one launch and reproduces PyTorch's rounding
order, so results match the modules in ``parallm.layers`` (RMSNorm, RotaryEmbedding) and
``F.silu(gate) * up``: math runs in float32 and every intermediate result that PyTorch
materialises in a half type is rounded to that type at the same point. bfloat16 rounding is
done on the bits (``_round_to``) so the Triton interpreter, whose float32->bfloat16 cast
truncates, gives the same answers as the GPU.

All functions take tensors whose last dim is contiguous, flatten the leading dims to rows, and
never synchronise with the host, so they can be captured in a CUDA graph (compile them once
before capturing). CPU tensors work only under the Triton interpreter (``TRITON_INTERPRET=1``
set before triton is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from parallm.kernels.pdl import pdl_launch, wait_for_producer

# Rows up to this many elements are normalised from registers (one read of each input);
# longer rows take a two-pass path over chunks of _NORM_CHUNK (larger chunks spill there).
_MAX_NORM_BLOCK = 16384
_NORM_CHUNK = 4096
_SILU_BLOCK = 1024
# Rotary: each program covers up to this many (head, dim-pair) elements.
_ROTARY_TILE = 2048
# Keep a*b + c as two roundings (PyTorch runs them as separate kernels), not one FMA.
_NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` (nearest-even), returned as float32."""
    if dtype == tl.bfloat16:
        # Round the top 16 bits to nearest-even by hand; NaNs pass through untouched.
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        y = tl.where(x == x, rounded, x)
    elif dtype == tl.float16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


# ---------------------------------------------------------------------------------------------
# RMSNorm


@triton.jit
def _load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual, rounded to x's dtype and written out) as float32."""
    h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        h = _round_to(h + r, x_row.dtype.element_ty)
        tl.store(res_out_row + cols, h.to(res_out_row.dtype.element_ty), mask=mask)
    return h


@triton.jit
def _store_normed(h, rstd, w_ptr, out_row, cols, mask, X_DTYPE: tl.constexpr):
    # RMSNorm casts the normalised row to x's dtype before scaling by the weight.
    normed = _round_to(h * rstd, X_DTYPE)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype: tl.constexpr = out_row.dtype.element_ty
    tl.store(out_row + cols, _round_to(normed * w, out_dtype).to(out_dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    n_cols,
    inv_n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)  # the final norm of a one-row step, between PDL-launched GEMVs
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_res
    res_out_row = res_out_ptr + row * stride_res_out
    out_row = out_ptr + row * stride_out
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:
        # The whole row stays in registers: every input is read once, even when res_out
        # aliases an input (all loads happen before the stores).
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = _load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL)
        # Like torch's mean: sum times 1/n.
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) * inv_n + eps)
        _store_normed(h, rstd, w_ptr, out_row, cols, mask, X_DTYPE)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_cols
            h = _load_row_sum(x_row, res_row, res_out_row, cols, mask, HAS_RESIDUAL)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) * inv_n + eps)
        # Second pass re-reads the summed row from res_out (same layout, so each thread reads
        # back what it wrote), which stays right when res_out aliases x or residual.
        src_row = res_out_row if HAS_RESIDUAL else x_row
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_cols
            h = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
            _store_normed(h, rstd, w_ptr, out_row, cols, mask, X_DTYPE)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with a unit stride along n (a view when possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _out_rows(
    out: torch.Tensor | None, shape: torch.Size, like: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A caller's output buffer (checked) or a new one, viewed as rows."""
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=like.device)
    elif out.shape != shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(f"out must be {dtype} {tuple(shape)} on {like.device}")
    elif out.stride(-1) != 1:
        raise ValueError("out needs a contiguous last dim")
    # view, not reshape: writes into a copy would be lost.
    return out.view(-1, shape[-1])


def _norm_launch(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, NUM_CHUNKS, num_warps) for a row of n_cols elements."""
    block = triton.next_power_of_2(n_cols)
    if block > _MAX_NORM_BLOCK:
        block = _NORM_CHUNK
    num_chunks = triton.cdiv(n_cols, block)
    # About 8 elements per thread: 16-byte loads in half precision.
    num_warps = min(16, max(1, block // 256))
    return block, num_chunks, num_warps


def _rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    pdl: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    x2 = _as_rows(x)
    res2 = res_out2 = x2  # placeholders, unused without a residual
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual must have x's shape and dtype")
        res2 = _as_rows(residual)
        res_out2 = _out_rows(residual_out, x.shape, x, x.dtype)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out2 = _out_rows(out, x.shape, x, out_dtype)
    normed = out2.view(x.shape)
    new_residual = res_out2.view(x.shape) if residual is not None else None
    if x2.shape[0] == 0:
        return normed, new_residual
    block, num_chunks, num_warps = _norm_launch(n_cols)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        weight.contiguous(),
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        n_cols,
        1.0 / n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        NUM_CHUNKS=num_chunks,
        num_warps=num_warps,
        **_NO_FMA,
        **pdl_launch(x, pdl),
    )
    return normed, new_residual


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``RMSNorm.forward``: float32 statistics, cast to x's dtype, then times ``weight``.

    x: [..., n]; weight: [n]. The result has ``torch.promote_types(x.dtype, weight.dtype)``
    (x's dtype when they agree) and x's shape, written to ``out`` when given.
    """
    return _rms_norm(x, None, weight, eps, out, None, pdl)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)`` in one pass over the row.

    x and residual share shape and dtype; the sum is rounded to that dtype before it is
    normalised, as the unfused model does. New tensors unless ``out`` / ``residual_out`` are
    given; ``residual_out`` may be ``residual`` (or ``x``) itself for an in-place update.
    """
    normed, new_residual = _rms_norm(x, residual, weight, eps, out, residual_out, pdl)
    assert new_residual is not None
    return normed, new_residual


# ---------------------------------------------------------------------------------------------
# SiLU and mul


@triton.jit
def _silu_and_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    stride_gate,
    stride_up,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    # PyTorch's silu is x / (1 + expf(-x)) with an IEEE division; tl.exp would use the
    # faster, less accurate ex2.approx. libdevice is compiled-only, so the interpreter
    # (numpy's exact exp) takes the other branch.
    e = libdevice.exp(-g) if PRECISE_EXP else tl.exp(-g)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    silu = _round_to(tl.math.div_rn(g, 1.0 + e), dtype)
    y = _round_to(silu * u, dtype)
    tl.store(out_ptr + row * stride_out + cols, y.to(dtype), mask=mask)


def silu_and_mul(
    gate_up_or_gate: torch.Tensor,
    up: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.silu(gate) * up``, rounded as PyTorch rounds it, in the input dtype.

    Either one tensor ``[..., 2n]`` holding gate then up (a merged gate/up projection), or
    ``gate`` and ``up`` of the same shape and dtype. Returns ``[..., n]`` (into ``out`` when
    given).
    """
    if up is None:
        if gate_up_or_gate.shape[-1] % 2:
            raise ValueError("a merged gate_up tensor needs an even last dim")
        gate, up = gate_up_or_gate.chunk(2, dim=-1)
    else:
        gate = gate_up_or_gate
        if up.shape != gate.shape or up.dtype != gate.dtype:
            raise ValueError("gate and up must share shape and dtype")
    n_cols = gate.shape[-1]
    gate2, up2 = _as_rows(gate), _as_rows(up)
    out2 = _out_rows(out, gate.shape, gate, gate.dtype)
    rows = gate2.shape[0]
    if rows and n_cols:
        grid = (rows, triton.cdiv(n_cols, _SILU_BLOCK))
        _silu_and_mul_kernel[grid](
            gate2,
            up2,
            out2,
            gate2.stride(0),
            up2.stride(0),
            out2.stride(0),
            n_cols,
            BLOCK=_SILU_BLOCK,
            PRECISE_EXP=gate.is_cuda,
            num_warps=4,
            **_NO_FMA,
        )
    return out2.view(gate.shape)


# ---------------------------------------------------------------------------------------------
# Rotary embedding


@triton.jit
def _load_cos_sin(row_ptr, d, dmask, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """Both halves of one cache row, cast to DTYPE as RotaryEmbedding casts them."""
    lo = tl.load(row_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    hi = tl.load(row_ptr + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    return _round_to(lo, DTYPE), _round_to(hi, DTYPE)


@triton.jit
def _rope_token_setup(pos_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin, HALF: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """The program's token and head block, and its position's cos/sin halves (loaded once)."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c1, c2 = _load_cos_sin(cos_ptr + pos * stride_cos, d, dmask, HALF, DTYPE)
    s1, s2 = _load_cos_sin(sin_ptr + pos * stride_sin, d, dmask, HALF, DTYPE)
    return t, hb, d, dmask, c1, c2, s1, s2


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
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Heads [head0, head0 + BLOCK_H) of one token: x * cos + rotate_half(x) * sin.

    c1/s1 are the cos/sin of the first half of the dims, c2/s2 of the second, already
    rounded to the output dtype.
    """
    h = head0 + tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & dmask[None, :]
    in_offs = h[:, None] * stride_in_h + d[None, :]
    out_offs = h[:, None] * stride_out_h + d[None, :]
    x1 = tl.load(in_row + in_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_row + in_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_row.dtype.element_ty
    # Each product, then the sum, is rounded to the dtype, as PyTorch's separate kernels do.
    # rotate_half(x) = [-x2, x1]; rounding commutes with negation.
    a1 = _round_to(x1 * c1[None, :], dtype)
    b1 = _round_to(x2 * s1[None, :], dtype)
    a2 = _round_to(x2 * c2[None, :], dtype)
    b2 = _round_to(x1 * s2[None, :], dtype)
    tl.store(out_row + out_offs, _round_to(a1 - b1, dtype).to(dtype), mask=mask)
    tl.store(out_row + out_offs + HALF, _round_to(a2 + b2, dtype).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_k_heads,
    num_q_blocks,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Grid: (tokens, q head blocks + k head blocks); the cos/sin row is loaded once per program.
    dtype: tl.constexpr = q_out_ptr.dtype.element_ty
    t, hb, d, dmask, c1, c2, s1, s2 = _rope_token_setup(
        pos_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin, HALF, BLOCK_HALF, dtype
    )
    if hb < num_q_blocks:
        q_row, q_out_row = q_ptr + t * stride_qt, q_out_ptr + t * stride_qot
        head0 = hb * BLOCK_H
        _rope_heads(
            q_row, q_out_row, stride_qh, stride_qoh, head0, num_q_heads, c1, c2, s1, s2, d, dmask,
            HALF, BLOCK_H,
        )  # fmt: skip
    else:
        k_row, k_out_row = k_ptr + t * stride_kt, k_out_ptr + t * stride_kot
        head0 = (hb - num_q_blocks) * BLOCK_H
        _rope_heads(
            k_row, k_out_row, stride_kh, stride_koh, head0, num_k_heads, c1, c2, s1, s2, d, dmask,
            HALF, BLOCK_H,
        )  # fmt: skip


def _check_rotary_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0]:
        raise ValueError("q and k must be [tokens, heads, head_dim] with the same tokens")
    head_dim = q.shape[-1]
    if head_dim % 2 or k.shape[-1] != head_dim or cos_cache.shape[-1] != head_dim:
        raise ValueError("q, k and the caches need one even head_dim")
    if q.dtype != k.dtype:
        raise ValueError("q and k must share a dtype")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous head_dim (row strides are fine)")
    if cos_cache.shape != sin_cache.shape or cos_cache.dim() != 2:
        raise ValueError("cos_cache and sin_cache must both be [max_positions, head_dim]")
    if positions.shape != (q.shape[0],):
        raise ValueError("positions must be [tokens]")


def _rotary_out(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError("a rotary output must match its input's shape and dtype")
    return out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``RotaryEmbedding.forward`` (rotate-half RoPE) for q and k in one launch.

    q: [T, Hq, D], k: [T, Hk, D], any token/head strides with a contiguous D (e.g. views into
    a fused qkv projection); cos_cache, sin_cache: [max_positions, D] in the ``cat([f, f])``
    layout; positions: [T] integer, each below max_positions (not checked: that would sync with
    the host). Writes new contiguous tensors unless ``q_out`` / ``k_out``
    are given; passing ``q_out=q, k_out=k`` rotates in place (every element is read before
    its own program overwrites it).
    """
    _check_rotary_inputs(q, k, cos_cache, sin_cache, positions)
    q_out, k_out = _rotary_out(q_out, q), _rotary_out(k_out, k)
    tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if tokens == 0:
        return q_out, k_out
    cos_cache, sin_cache = _unit_last_stride(cos_cache), _unit_last_stride(sin_cache)
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(
        triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(1, _ROTARY_TILE // block_half)
    )
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (tokens, num_q_blocks + triton.cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](
        q, k, q_out, k_out, cos_cache, sin_cache, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        num_q_heads, num_k_heads, num_q_blocks,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_H=block_h,
        num_warps=4,
        **_NO_FMA,
    )  # fmt: skip
    return q_out, k_out


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
