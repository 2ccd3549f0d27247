"""The SwiGLU activation of the MLP: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` of a packed ``[..., 2 * I]`` input (gate first), or of two inputs."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        if up is None:
            gate, up = gate.chunk(2, dim=-1)
        return F.silu(gate) * up
