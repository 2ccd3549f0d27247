"""fp8 (e4m3fn) weights with one scale per output channel, as vLLM's online ``fp8``
quantization stores them: ``s = max|row| / 448`` maps each row's largest magnitude onto e4m3's
largest finite value, and ``q = e4m3(w / s)`` rounds to nearest. e4m3 keeps 3 mantissa bits, so
a value in the normal range (``|w / s| >= 2**-6``) comes back within a relative ``2**-4``; the
subnormals below it within an absolute ``s * 2**-10`` (half their spacing).

The GEMM (:func:`fp8_linear`): on GPUs with fp8 tensor cores (compute capability 8.9 and
later) the activations are quantized per token (row) to e4m3 at each call, and
``torch._scaled_mm`` multiplies the two fp8 operands with rowwise scales (per-token for x,
per-output-channel for W) into bf16; one-row calls read the fp8 weight with the Triton GEMV
instead (weight-only, the activations stay in their dtype), as do calls of a few rows with
float32 activations (the few-rows Triton GEMM). Elsewhere the weight is dequantized (the
reference)."""

from __future__ import annotations

import torch

from parallm.layers.quantization.format import (
    WeightFormat,
    dequantize_rows,
    dequantized_linear,
    device_capability,
    row_scales,
    triton_weight_only_linear,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` (any float dtype) -> ``(q float8_e4m3fn [out, in], scale float32 [out])``."""
    w = w.float()
    scale = row_scales(w, FP8_MAX)
    # The division may land a hair above 448; e4m3fn has no infinity, so clamp before casting.
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference inverse of :func:`quantize_fp8`, in ``dtype``."""
    return dequantize_rows(q, scale, dtype)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: ``x [M, K]`` -> ``(e4m3 [M, K], float32 scale [M, 1])``,
    one scale per row (token), as vLLM's dynamic per-token fp8."""
    q, scale = quantize_fp8(x)
    return q, scale[:, None]


def scaled_mm_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T + b`` with x quantized per token and both fp8 operands multiplied by
    ``torch._scaled_mm`` (rowwise scales: ``scale_a [M, 1]``, ``scale_b [1, N]``, float32). The
    second operand must be column-major: ``q.t()`` of the row-major ``[N, K]`` weight is. The
    rowwise kernels write bf16 only, so other activation dtypes get a cast of the output."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = _activations_per_token(rows)
    fused_bias = bias if bias is not None and x.dtype == torch.bfloat16 else None
    y = torch._scaled_mm(
        xq, q.t(), scale_a=x_scale, scale_b=scale.view(1, -1), bias=fused_bias,
        out_dtype=torch.bfloat16,
    )  # fmt: skip
    y = y.to(x.dtype)
    if bias is not None and fused_bias is None:
        y = y + bias
    return y.view(*x.shape[:-1], q.shape[0])


def _activations_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_per_token`, by the one-pass Triton kernel on CUDA."""
    if rows.is_cuda:
        from parallm.kernels import quant_gemv  # imports triton, present wherever CUDA runs

        if rows.shape[-1] <= quant_gemv.PER_TOKEN_MAX_K:
            return quant_gemv.per_token_fp8(rows.contiguous())
    return quantize_fp8_per_token(rows)


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The fp8 GEMM: see the module docstring for which path runs where."""
    if x.numel() > x.shape[-1] and _scaled_mm_runs(x, q):
        return scaled_mm_linear(x, q, scale, bias)
    y = triton_weight_only_linear(x, q, scale, bias)
    return y if y is not None else dequantized_linear(x, q, scale, bias)


def _scaled_mm_runs(x: torch.Tensor, q: torch.Tensor) -> bool:
    """fp8 tensor cores (8.9+), 16-bit activations, and the dimensions that cuBLAS's fp8 GEMM
    takes (multiples of 16)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and q.shape[0] % 16 == 0
        and q.shape[1] % 16 == 0
        and device_capability(x.device) >= (8, 9)
    )


FP8 = WeightFormat("fp8", FP8_DTYPE, quantize_fp8, dequantize_fp8, fp8_linear)
