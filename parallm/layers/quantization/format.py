"""What a weight format is: a storage dtype and the quantize/dequantize pair that maps float
weights to it and back, with one float32 scale per output channel (row of ``W[out, in]``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Quantize = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Dequantize = Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]

# A row of zeros still gets a positive scale, so dividing by it is safe (its values stay 0).
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class WeightFormat:
    """``quantize(w[out, in]) -> (q[out, in] in dtype, scale[out] float32)``;
    ``dequantize(q, scale, dtype) -> q * scale[:, None]`` computed in float32, cast to dtype."""

    name: str
    dtype: torch.dtype
    quantize: Quantize
    dequantize: Dequantize


def row_scales(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row float32 scales that map each row's largest magnitude onto ``qmax``."""
    amax = w.abs().amax(dim=-1).float()
    return amax.clamp(min=MIN_SCALE) / qmax


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` row by row, in float32, then cast to ``dtype`` (the activations')."""
    return (q.float() * scale[:, None]).to(dtype)
