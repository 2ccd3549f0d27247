"""Batch-1 GEMVs with their producer fused in: RMSNorm (+ residual add) before q/k/v and
gate/up, SiLU-and-mul before down. An experiment towards a 1B decode step near the bandwidth
roofline (docs/PERF_NOTES.md): each fusion removes a kernel and a kernel boundary (~2-3 us at
batch 1), and pays for it only if the GEMV itself keeps up with cuBLAS.
``benchmarks/fused_gemv_bench.py`` measured each fused pair faster than cuBLAS plus the separate
kernel on Llama-3.2-1B shapes (benchmarks/RESULTS.md), so one-token decode layers use them
(``DecoderLayer._forward_one_row``, on with the fused kernels).

``y = rms_norm(x [+ residual]) @ W^T`` and ``y = silu(gate) * up @ W^T`` for one row, W of shape
[N, K] with unit stride along K. Every program owns BLOCK_N output features, recomputes the
(cheap, L2-resident) prologue vector chunk by chunk and streams its rows of W once; there is no
split over K, so no second kernel. The prologue rounds where ``parallm.layers.fused_ops``
rounds (PyTorch's order); its sum of squares and the GEMV's sums run in another order than the
norm kernel's and cuBLAS's, so results agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from parallm.layers.fused_ops import _NO_FMA, _round_to


@triton.jit
def _norm_gemv_kernel(
    x_ptr, res_ptr, res_out_ptr, norm_w_ptr, w_ptr, y_ptr, N, K, stride_wn, inv_k, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    # Pass 1: the row's sum of squares (x + residual rounded to x's dtype, as the norm does).
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + offs_k
        h = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            h = _round_to(h + r, dtype)
            if pid == 0:
                tl.store(res_out_ptr + cols, h.to(dtype), mask=cols < K)
        sq += h * h
    rstd = tl.rsqrt(tl.sum(sq, axis=0) * inv_k + eps)
    # Pass 2: stream W; each chunk of the normalised vector is rebuilt from L2.
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        kmask = cols < K
        h = tl.load(x_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
            h = _round_to(h + r, dtype)
        g = tl.load(norm_w_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
        v = _round_to(_round_to(h * rstd, dtype) * g, dtype)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=kmask[None, :],
                    other=0.0)  # fmt: skip
        acc += w.to(tl.float32) * v[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _silu_gemv_kernel(
    gate_ptr, up_ptr, w_ptr, y_ptr, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    dtype: tl.constexpr = gate_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        kmask = cols < K
        g = tl.load(gate_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + cols, mask=kmask, other=0.0).to(tl.float32)
        e = libdevice.exp(-g) if PRECISE_EXP else tl.exp(-g)  # libdevice: compiled only
        silu = _round_to(tl.math.div_rn(g, 1.0 + e), dtype)
        v = _round_to(silu * u, dtype)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=kmask[None, :],
                    other=0.0)  # fmt: skip
        acc += w.to(tl.float32) * v[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def _check(x: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(-1) != 1:
        raise ValueError(f"x must be one contiguous row [1, K], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with unit stride along K")


def rms_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    block_n: int = 16,
    block_k: int = 512,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rms_norm(x + residual) @ weight.T, x + residual)`` for one row ``x`` of [1, K]."""
    k = x.shape[-1]
    _check(x, weight, k)
    n = weight.shape[0]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    res = residual if residual is not None else x
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, res, res_out if res_out is not None else x, norm_weight, weight, y, n, k,
        weight.stride(0), 1.0 / k, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        NUM_STAGES=num_stages, num_warps=num_warps, **_NO_FMA,
    )  # fmt: skip
    return y, res_out


def silu_mul_gemv(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    block_n: int = 16,
    block_k: int = 512,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T`` for one row ``gate_up`` of [1, 2K] (gate, then up)."""
    k = gate_up.shape[-1] // 2
    _check(gate_up, weight, k)
    n = weight.shape[0]
    y = torch.empty(1, n, dtype=gate_up.dtype, device=gate_up.device)
    _silu_gemv_kernel[(triton.cdiv(n, block_n),)](
        gate_up, gate_up[:, k:], weight, y, n, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, PRECISE_EXP=gate_up.is_cuda,
        num_warps=num_warps, **_NO_FMA,
    )  # fmt: skip
    return y
