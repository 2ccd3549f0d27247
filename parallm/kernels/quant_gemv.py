"""Triton kernels of the quantized linear layers (besides the one-row GEMVs of ``gemv.py``).

``weight_only_gemm``: ``y = (x @ q^T) * scale`` for ``x [M, K]`` (M up to ``MAX_ROWS``, a decode
batch), ``q [N, K]`` int8 or float8_e4m3fn with one float32 ``scale`` per output row.

A decode step of a few sequences reads every weight once and does little arithmetic, so its
time is the weight stream: reading one byte per weight instead of dequantizing to a 16-bit copy
first (which writes and reads that copy every call) is what makes int8 weights pay off for
batches the one-row GEMVs (``parallm.kernels.gemv``) do not cover. Every program owns
``BLOCK_M x BLOCK_N`` outputs, converts each W tile to the activations' dtype in registers
(exact: int8 and e4m3 values are bf16/fp16 values) and accumulates ``tl.dot`` in float32; the
row scales multiply the sums once at the end. float32 activations use IEEE float32 products
(no TF32). The PyTorch twin is ``parallm.kernels.reference.gemv_ref`` (which takes any number
of rows). Tiles are fixed, not autotuned: the kernel runs inside captured CUDA graphs.

``per_token_fp8``: the dynamic per-token activation quantization in front of ``torch._scaled_mm``
in one pass over x (PyTorch's version reads and writes it several times): each row's scale
``max(|row|, 1e-12) / 448`` and the row divided by it, clamped and rounded to nearest e4m3,
bit for bit what ``parallm.layers.quantization.fp8.quantize_fp8`` computes (its twin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parallm.kernels.gemv import weights_as
from parallm.kernels.rope_store import to_cache

MIN_SCALE = tl.constexpr(1e-12)  # as parallm.layers.quantization.format.MIN_SCALE
E4M3_MAX = tl.constexpr(448.0)
PER_TOKEN_MAX_K = 32768  # a row is quantized from registers in one load
MAX_ROWS = 64  # past this the GEMM is no longer weight-bound; callers dequantize for cuBLAS
_BLOCK_M = 16  # tl.dot's smallest M; fewer rows are masked
_BLOCK_K = 128
_NARROW_N = 8192  # up to this many outputs, narrow N tiles so the grid fills the GPU


@triton.jit
def _weight_only_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + offs_k
        k_mask = cols < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(x, tl.trans(weights_as(w, dtype)), acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc * scale[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])  # fmt: skip


def weight_only_gemm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block_n: int | None = None
) -> torch.Tensor:
    """``(x @ weight^T) * weight_scale`` for ``x [M, K]`` (M <= ``MAX_ROWS``, unit stride along
    K) and a quantized ``weight [N, K]`` with float32 ``weight_scale [N]``; ``[M, N]`` in x's
    dtype. ``block_n`` left out: 32 for up to 8192 outputs, else 64."""
    m, k = x.shape
    n = weight.shape[0]
    if x.dim() != 2 or x.stride(-1) != 1 or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x must be [M, K] with 1 <= M <= {MAX_ROWS} and unit stride along K, "
                         f"got {tuple(x.shape)}")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with unit stride along K")
    if weight_scale.shape != (n,) or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 [{n}], got {weight_scale.dtype} "
                         f"{tuple(weight_scale.shape)}")  # fmt: skip
    block_n = block_n or (32 if n <= _NARROW_N else 64)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, _BLOCK_M))
    _weight_only_gemm_kernel[grid](
        x, weight, weight_scale.contiguous(), y, m, n, k, x.stride(0), weight.stride(0),
        y.stride(0), BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_BLOCK_K,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4, num_stages=4,
    )  # fmt: skip
    return y


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                          BLOCK_K: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), MIN_SCALE), E4M3_MAX)
    tl.store(scale_ptr + row, scale)
    tl.store(q_ptr + row * stride_qm + cols, to_cache(x, scale, tl.float8e4nv), mask=mask)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` (unit stride along K, K <= ``PER_TOKEN_MAX_K``) -> ``(e4m3 [M, K], float32
    scale [M, 1])``, one scale per row (module docstring)."""
    if x.dim() != 2 or x.stride(-1) != 1 or not 1 <= x.shape[1] <= PER_TOKEN_MAX_K:
        raise ValueError(f"x must be [M, K] with K <= {PER_TOKEN_MAX_K} and unit stride along "
                         f"K, got {tuple(x.shape)}")  # fmt: skip
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block_k = triton.next_power_of_2(k)
    _per_token_fp8_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k,
        num_warps=min(16, max(4, block_k // 1024)),
    )  # fmt: skip
    return q, scale
