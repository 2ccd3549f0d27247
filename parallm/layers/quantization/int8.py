"""int8 weights, symmetric, one scale per output channel (gpt-fast's and torchao's weight-only
int8): ``q = round(w / s)`` with ``s = max|row| / 127``, so ``|w - q s| <= s / 2``.

The GEMM (:func:`int8_linear`) is weight-only: the activations stay in their dtype. On CPU,
``torch._weight_int8pack_mm`` for bf16 activations and up to ``INT8PACK_MAX_ROWS`` rows (it
takes the scales in the activations' dtype; for float32 and float16 activations and for more
rows it is slower than dequantizing: ``benchmarks/quant_gemm_bench.py``). On CUDA, calls of one
row read the int8 weight with the Triton GEMV and calls of a few rows (a decode batch) with the
few-rows Triton GEMM (``parallm.kernels.quant_gemv``); larger ones dequantize for cuBLAS
(torch's CUDA ``_weight_int8pack_mm`` is a one-thread-per-output kernel)."""

from __future__ import annotations

import torch

from parallm.layers.quantization.format import (
    WeightFormat,
    dequantize_rows,
    dequantized_linear,
    row_scales,
    triton_weight_only_linear,
)

INT8_MAX = 127  # -128 is left unused so the range is symmetric


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` (any float dtype) -> ``(q int8 [out, in], scale float32 [out])``."""
    w = w.float()
    scale = row_scales(w, INT8_MAX)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference inverse of :func:`quantize_int8`, in ``dtype``."""
    return dequantize_rows(q, scale, dtype)


def int8pack_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T + b`` by ``torch._weight_int8pack_mm`` (CPU): int8 weights converted inside the
    GEMM, each output column times its scale cast to x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch._weight_int8pack_mm(rows, q, scale.to(x.dtype))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], q.shape[0])


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The int8 GEMM: see the module docstring for which path runs where."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.numel() <= (INT8PACK_MAX_ROWS * x.shape[-1])
    ):
        return int8pack_linear(x, q, scale, bias)
    y = triton_weight_only_linear(x, q, scale, bias)
    return y if y is not None else dequantized_linear(x, q, scale, bias)


INT8PACK_MAX_ROWS = 32

INT8 = WeightFormat("int8", torch.int8, quantize_int8, dequantize_int8, int8_linear)
