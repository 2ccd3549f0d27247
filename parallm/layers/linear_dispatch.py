"""Route decode-sized linear layers to the Triton skinny GEMM, from outside the model.

cuBLAS streams the large decode GEMVs near memory bandwidth but not the small ones (q/k/v and
o of a 1B model: 1.3-1.9 TB/s on an H100, benchmarks/RESULTS.md). ``use_skinny_gemm`` swaps
the class of the model's ``nn.Linear`` modules (parameters untouched) so that inputs of at most
``max_rows`` rows go to :func:`parallm.layers.skinny_gemm.skinny_linear`; anything larger
(prefill, big decode batches) stays on cuBLAS. The row count is static per captured CUDA graph,
so the choice is made once per graph size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SkinnyDispatchLinear(nn.Linear):
    """An ``nn.Linear`` whose small-batch calls use the Triton skinny GEMM."""

    max_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= self.max_rows:
            from parallm.layers.skinny_gemm import skinny_linear

            return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_skinny_gemm(model: nn.Module, max_rows: int, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Send linears' calls of at most ``max_rows`` rows to the skinny GEMM (0 turns it off).

    Modules whose name ends with a name in ``skip`` keep cuBLAS (the LM head already streams
    near bandwidth). Returns how many modules were switched.
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in skip:
            continue
        if max_rows <= 0:
            if isinstance(module, SkinnyDispatchLinear):
                module.__class__ = nn.Linear
            continue
        module.__class__ = SkinnyDispatchLinear
        module.max_rows = max_rows
        count += 1
    return count
