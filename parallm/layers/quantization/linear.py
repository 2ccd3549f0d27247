"""Quantized versions of the linear layers, installed on a built model by class swap.

Each is a subclass of the layer it replaces, so it keeps that layer's attributes (tensor-parallel
fields, ``output_sizes``, ``q_size``...) and its checkpoint loader's slicing. What changes:
``weight`` holds the quantized values (int8 or float8_e4m3fn, ``[out, in]``) and a float32 buffer
``weight_scale [out]`` holds one scale per output channel. The parameter names stay the
checkpoint's, so a float checkpoint still loads into a quantized model: the weight loader
quantizes each checkpoint tensor, then places its rows and their scales as the float layer
would (per-row scales commute with taking rows).

The GEMM itself is one method, :meth:`QuantizedLinear.quantized_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from parallm.layers.quantization.format import WeightFormat


@dataclass(frozen=True)
class QuantizedCheckpointTensor:
    """A checkpoint weight stored quantized, in the runtime's form: ``values [N, K]`` in the
    format's dtype (a tensor, or an unread checkpoint slice that a tensor-parallel loader
    narrows) and ``row_scales [N]`` float32 (``checkpoint.runtime_weight`` builds it)."""

    values: Any
    row_scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.values.shape)


class QuantizedLinear(nn.Module):
    """Mixin placed before a linear layer class; see the module docstring."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_scale: torch.Tensor
    weight_format: WeightFormat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_linear(x)

    def quantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` with ``W`` the dequantized weight, by the format's GEMM for the device
        (``WeightFormat.linear``: ``torch._scaled_mm``, ``_weight_int8pack_mm``, the Triton
        GEMV, or the dequantize reference)."""
        return self.weight_format.linear(x, self.weight, self.weight_scale, self.bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
    ) -> None:
        """A float checkpoint tensor for ``weight``: quantized whole (one scale per row of the
        checkpoint tensor), then its values and scales go where the float layer puts its rows.
        A stored-quantized one (``QuantizedCheckpointTensor``: values and per-row scales) is
        placed as it is. Other parameters (the bias) load as in the float layer."""
        parent = super().weight_loader  # type: ignore[misc]
        if param is not self.weight:
            parent(param, loaded, shard_id)
            return
        if isinstance(loaded, QuantizedCheckpointTensor):
            parent(self.weight, loaded.values, shard_id)
            parent(self.weight_scale, loaded.row_scales, shard_id)
            return
        q, scale = self.weight_format.quantize(loaded.to(param.device))
        parent(self.weight, q, shard_id)
        parent(self.weight_scale, scale, shard_id)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_format={self.weight_format.name}"


class QuantizedColumnParallelLinear(QuantizedLinear, ColumnParallelLinear):
    pass


class QuantizedRowParallelLinear(QuantizedLinear, RowParallelLinear):
    pass


class QuantizedMergedColumnParallelLinear(QuantizedLinear, MergedColumnParallelLinear):
    pass


class QuantizedQKVParallelLinear(QuantizedLinear, QKVParallelLinear):
    pass


# Exact classes: the LM head (a ColumnParallelLinear subclass) stays float on purpose; it may
# share its weight with the embedding, and the logits are the most sensitive GEMM.
QUANTIZED_CLASSES: dict[type[nn.Module], type[QuantizedLinear]] = {
    ColumnParallelLinear: QuantizedColumnParallelLinear,
    RowParallelLinear: QuantizedRowParallelLinear,
    MergedColumnParallelLinear: QuantizedMergedColumnParallelLinear,
    QKVParallelLinear: QuantizedQKVParallelLinear,
}


@torch.no_grad()
def quantize_linear(module: nn.Module, weight_format: WeightFormat) -> None:
    """Turn a loaded float linear layer into its quantized class, in place."""
    q, scale = weight_format.quantize(module.weight)
    module.__class__ = QUANTIZED_CLASSES[type(module)]
    module.weight_format = weight_format
    module.weight = nn.Parameter(q, requires_grad=False)  # frees the float weight
    module.register_buffer("weight_scale", scale)
    # The loaders were bound to the float class; rebind them to the quantizing one.
    for param in module.parameters(recurse=False):
        param.weight_loader = module.weight_loader
