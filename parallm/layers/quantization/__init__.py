"""Online weight quantization: ``quantize_model(model, "fp8" | "int8")`` turns every linear
layer of a loaded float model except the LM head into a quantized one (``linear.py``), with one
float32 scale per output channel. Formats: ``int8.py``, ``fp8.py``, each a quantize function and
its PyTorch dequantize twin."""

from __future__ import annotations

from torch import nn

from parallm.layers.quantization.format import WeightFormat
from parallm.layers.quantization.fp8 import FP8
from parallm.layers.quantization.int8 import INT8
from parallm.layers.quantization.linear import QUANTIZED_CLASSES, QuantizedLinear, quantize_linear

WEIGHT_FORMATS: dict[str, WeightFormat] = {"fp8": FP8, "int8": INT8}
QUANTIZATION_METHODS = tuple(WEIGHT_FORMATS)

__all__ = [
    "QUANTIZATION_METHODS",
    "WEIGHT_FORMATS",
    "QuantizedLinear",
    "WeightFormat",
    "check_quantization",
    "is_quantized",
    "quantization_summary",
    "quantize_model",
]


def check_quantization(method: str | None) -> str | None:
    """``method`` if it names a weight format (or is None); a ValueError naming them if not."""
    if method is not None and method not in WEIGHT_FORMATS:
        raise ValueError(
            f"quantization must be one of {list(QUANTIZATION_METHODS)} or None, got {method!r}"
        )
    return method


def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize every column/row/merged/QKV-parallel linear layer of ``model`` in place (the LM
    head stays float); returns how many were quantized."""
    if method not in WEIGHT_FORMATS:
        raise ValueError(
            f"quantization must be one of {list(QUANTIZATION_METHODS)}, got {method!r}"
        )
    weight_format = WEIGHT_FORMATS[method]
    layers = [m for m in model.modules() if type(m) in QUANTIZED_CLASSES]
    for module in layers:
        quantize_linear(module, weight_format)
    return len(layers)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantization_summary(method: str | None) -> str:
    """The start-up summary's words for the weight format and the GEMM path that runs it."""
    if method is None:
        return "quantization=none"
    return (
        f"quantization={method} (per-channel weights; GEMMs dequantize in PyTorch, no kernels yet)"
    )
