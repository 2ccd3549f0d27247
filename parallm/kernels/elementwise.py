"""Fused Triton kernels for the small per-layer ops of a decoder: RMSNorm (optionally with the
residual add) and SiLU-and-mul (rotary embedding: ``parallm.kernels.rope_store``).

Results match ``parallm.layers``' RMSNorm and ``F.silu(gate) * up``: math runs in float32 and
every intermediate result that PyTorch materialises in a half type is rounded to that type at
the same point. bfloat16 rounding is done on the bits (``_round_to``) so the Triton
interpreter, whose float32->bfloat16 cast truncates, gives the same answers as the GPU.

The functions flatten the leading dims to rows (the last dim contiguous) and never synchronise
with the host, so they can be captured in a CUDA graph. CPU tensors work only under the Triton
interpreter.
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
_NORM_ROW_TILE = 2048
_SILU_BLOCK = 1024
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
def _store_normed(h, rstd, w, out_row, cols, mask, X_DTYPE: tl.constexpr):
    # RMSNorm casts the normalised row to x's dtype before scaling by the weight (float32).
    normed = _round_to(h * rstd, X_DTYPE)
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
    n_rows,
    n_cols,
    inv_n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    ROWS: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_producer(PDL)  # the final norm of a one-row step, between PDL-launched GEMVs
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:
        # ROWS whole rows in registers: every input is read once, even when res_out aliases
        # an input (all loads happen before the stores).
        rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        h = _load_row_sum(x_ptr + rows * stride_x, res_ptr + rows * stride_res,
                          res_out_ptr + rows * stride_res_out, cols, mask, HAS_RESIDUAL)  # fmt: skip
        # Like torch's mean: sum times 1/n.
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) * inv_n + eps)[:, None]
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        _store_normed(h, rstd, w, out_ptr + rows * stride_out, cols, mask, X_DTYPE)
    else:
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        res_out_row = res_out_ptr + row * stride_res_out
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_cols
            h = _load_row_sum(x_row, res_ptr + row * stride_res, res_out_row, cols, mask,
                              HAS_RESIDUAL)  # fmt: skip
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) * inv_n + eps)
        # Second pass re-reads the summed row from res_out (same layout, so each thread reads
        # back what it wrote), which stays right when res_out aliases x or residual.
        src_row = res_out_row if HAS_RESIDUAL else x_row
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_cols
            h = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            _store_normed(h, rstd, w, out_ptr + row * stride_out, cols, mask, X_DTYPE)


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


def _norm_launch(n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK, NUM_CHUNKS, ROWS, num_warps) for n_rows rows of n_cols elements."""
    block = triton.next_power_of_2(n_cols)
    if block > _MAX_NORM_BLOCK:
        block = _NORM_CHUNK
    num_chunks = triton.cdiv(n_cols, block)
    # Narrow rows (per-head q/k norms: thousands of 64- or 128-element rows) share a program
    # up to _NORM_ROW_TILE elements; a program of one such row is one warp's short read.
    rows = 1 if num_chunks > 1 else max(1, min(_NORM_ROW_TILE // block, n_rows))
    rows = triton.next_power_of_2(rows)
    # About 8 elements per thread: 16-byte loads in half precision.
    num_warps = min(16, max(1, rows * block // 256))
    return block, num_chunks, rows, num_warps


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
    block, num_chunks, rows, num_warps = _norm_launch(x2.shape[0], n_cols)
    _rms_norm_kernel[(triton.cdiv(x2.shape[0], rows),)](
        x2,
        res2,
        weight.contiguous(),
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        x2.shape[0],
        n_cols,
        1.0 / n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        NUM_CHUNKS=num_chunks,
        ROWS=rows,
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
def silu_mul(g, u, PRECISE_EXP: tl.constexpr, dtype: tl.constexpr):
    """``silu(g) * u`` of float32 g and u, rounded to ``dtype`` where PyTorch rounds. PyTorch's
    silu is x / (1 + expf(-x)) with an IEEE division; tl.exp would use the faster, less accurate
    ex2.approx. libdevice is compiled-only, so the interpreter (numpy's exact exp) takes the
    other branch."""
    e = libdevice.exp(-g) if PRECISE_EXP else tl.exp(-g)
    silu = _round_to(tl.math.div_rn(g, 1.0 + e), dtype)
    return _round_to(silu * u, dtype)


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
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    y = silu_mul(g, u, PRECISE_EXP, dtype)
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
