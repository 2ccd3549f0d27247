"""Triton versions of the model's norm and activation layers, installed from outside by class
swap (parameters and module tree untouched): ``use_triton_layers(model)``.

The engine installs them on CUDA with ``fused_kernels``; the model itself only ever names the
plain PyTorch layers. Each variant computes what its parent does (tests compare them).
"""

from __future__ import annotations

import torch
from torch import nn

from parallm.kernels import elementwise
from parallm.layers.activation import SiluAndMul
from parallm.layers.norm import RMSNorm


class TritonRMSNorm(RMSNorm):
    """RMSNorm, and the residual add before it, in one Triton kernel."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return elementwise.rms_norm(x, self.weight, self.eps)
        return elementwise.fused_add_rms_norm(x, residual, self.weight, self.eps)


class TritonSiluAndMul(SiluAndMul):
    """``silu(gate) * up`` in one Triton kernel."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return elementwise.silu_and_mul(gate, up)


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: TritonRMSNorm,
    SiluAndMul: TritonSiluAndMul,
}


def use_triton_layers(model: nn.Module) -> int:
    """Swap every plain norm and activation layer of ``model`` for its Triton version; returns
    how many were swapped."""
    count = 0
    for module in model.modules():
        variant = _SWAPS.get(type(module))
        if variant is not None:
            module.__class__ = variant
            count += 1
    return count
