"""What a weight format is: a storage dtype and the quantize/dequantize pair that maps float
weights to it and back, with one float32 scale per output channel (row of ``W[out, in]``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Quantize = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Dequantize = Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# A row of zeros still gets a positive scale, so dividing by it is safe (its values stay 0).
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class WeightFormat:
    """``quantize(w[out, in]) -> (q[out, in] in dtype, scale[out] float32)``;
    ``dequantize(q, scale, dtype) -> q * scale[:, None]`` computed in float32, cast to dtype;
    ``linear(x, q, scale, bias) -> x @ dequantize(q, scale)^T + bias`` through the fastest GEMM
    the device has for the format (the dequantize reference where it has none)."""

    name: str
    dtype: torch.dtype
    quantize: Quantize
    dequantize: Dequantize
    linear: Linear


def row_scales(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row float32 scales that map each row's largest magnitude onto ``qmax``."""
    amax = w.abs().amax(dim=-1).float()
    # Divided by a tensor on amax's device: PyTorch's CUDA division by a Python number
    # multiplies by its reciprocal, one ulp off the correctly rounded quotient (the kernels').
    return amax.clamp(min=MIN_SCALE) / torch.full_like(amax, qmax)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` row by row, in float32, then cast to ``dtype`` (the activations')."""
    return (q.float() * scale[:, None]).to(dtype)


def dequantized_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The reference GEMM of every format: dequantize the whole weight to x's dtype, then
    ``F.linear`` (on a GPU this writes and reads a float copy of the weight every call)."""
    return F.linear(x, dequantize_rows(q, scale, x.dtype), bias)


def triton_weight_only_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x q^T * scale + bias`` by a Triton kernel that reads the quantized weight as stored
    (weight-only: x stays in its dtype), on CUDA: one row through the GEMV, a few rows (a
    decode batch, up to ``quant_gemv.MAX_ROWS``) through the few-rows GEMM. None where neither
    applies, so the caller takes another GEMM."""
    if not x.is_cuda or not gemv_reads(q.dtype, x.device):
        return None
    from parallm.kernels import gemv, quant_gemv  # import triton, present wherever CUDA runs

    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:
        y = gemv.gemv(rows.contiguous(), q, weight_scale=scale)
    elif 1 < rows.shape[0] <= quant_gemv.MAX_ROWS:
        y = quant_gemv.weight_only_gemm(rows.contiguous(), q, scale)
    else:
        return None
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], q.shape[0])


def gemv_reads(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the Triton GEMVs read weights of ``dtype`` on ``device``: int8 everywhere, e4m3
    where the GPU converts it (compute capability 8.9 and later) and on CPU (where Triton
    runs only as its interpreter, which converts it)."""
    if dtype == torch.float8_e4m3fn:
        return device.type == "cpu" or (
            device.type == "cuda" and device_capability(device) >= (8, 9)
        )
    return dtype == torch.int8


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)
