"""RMSNorm, computed in float32 like the reference implementations."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 statistics; the normalised row is cast to x's dtype before the scale, as Hugging
    Face does, so bf16 results match bit for bit."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale.

    Given a ``residual``, it first adds it to ``x`` and returns ``(normed, x + residual)``:
    the residual stream of a decoder layer, which a fused kernel can do in one pass.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        x = residual + x
        return rms_norm(x, self.weight, self.eps), x
