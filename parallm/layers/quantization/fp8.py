"""fp8 (e4m3fn) weights with one scale per output channel, as vLLM's online ``fp8``
quantization stores them: ``s = max|row| / 448`` maps each row's largest magnitude onto e4m3's
largest finite value, and ``q = e4m3(w / s)`` rounds to nearest. e4m3 keeps 3 mantissa bits, so
a value in the normal range (``|w / s| >= 2**-6``) comes back within a relative ``2**-4``; the
subnormals below it within an absolute ``s * 2**-10`` (half their spacing)."""

from __future__ import annotations

import torch

from parallm.layers.quantization.format import WeightFormat, dequantize_rows, row_scales

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


FP8 = WeightFormat("fp8", FP8_DTYPE, quantize_fp8, dequantize_fp8)
