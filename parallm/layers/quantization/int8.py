"""int8 weights, symmetric, one scale per output channel (gpt-fast's and torchao's weight-only
int8): ``q = round(w / s)`` with ``s = max|row| / 127``, so ``|w - q s| <= s / 2``."""

from __future__ import annotations

import torch

from parallm.layers.quantization.format import WeightFormat, dequantize_rows, row_scales

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


INT8 = WeightFormat("int8", torch.int8, quantize_int8, dequantize_int8)
