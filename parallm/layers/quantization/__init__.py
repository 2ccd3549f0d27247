"""Weight quantization: ``quantize_model(model, "fp8" | "int8")`` turns every linear layer of a
loaded float model except the LM head into a quantized one (``linear.py``), with one float32
scale per output channel. Formats: ``int8.py``, ``fp8.py``, each a quantize function, its
PyTorch dequantize twin and its GEMM. Checkpoints stored quantized (``checkpoint.py``) load
into the same layers."""

from __future__ import annotations

from torch import nn

from parallm.layers.quantization.checkpoint import (
    StoredQuantization,
    stored_quantization,
    weight_format_name,
)
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
    "StoredQuantization",
    "WeightFormat",
    "check_quantization",
    "check_stored_quantization",
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


def check_stored_quantization(
    method: str | None, raw_config: dict, load_format: str = "auto"
) -> StoredQuantization | None:
    """How the checkpoint stores its weights (None: float, or dummy weights), checked against
    the ``quantization`` argument before anything loads: unset or the same format."""
    if load_format == "dummy":
        return None
    stored = stored_quantization(raw_config)
    if stored is not None and method is not None and method != stored.weight_format.name:
        raise ValueError(
            f"quantization={method!r} does not match the checkpoint, stored quantized as "
            f"{stored.weight_format.name} (quantization_config quant_method {stored.method!r}); "
            f"leave quantization unset or pass {stored.weight_format.name!r}"
        )
    return stored


def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize every column/row/merged/QKV-parallel linear layer of ``model`` in place (the LM
    head stays float); returns how many were quantized. A model already quantized (online, or
    by its checkpoint, whose float layers stay float) is left as it is."""
    if method not in WEIGHT_FORMATS:
        raise ValueError(
            f"quantization must be one of {list(QUANTIZATION_METHODS)}, got {method!r}"
        )
    present = weight_format_name(model)
    if present is not None:
        if present != method:
            raise ValueError(f"quantization={method!r}, but the model's weights are {present}")
        return 0
    weight_format = WEIGHT_FORMATS[method]
    layers = [m for m in model.modules() if type(m) in QUANTIZED_CLASSES]
    for module in layers:
        quantize_linear(module, weight_format)
    return len(layers)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantization_summary(method: str | None, stored: StoredQuantization | None = None) -> str:
    """The start-up summary's words for the weight format and where it comes from."""
    if stored is not None:
        return (
            f"quantization={stored.weight_format.name} (stored {stored.method} checkpoint; "
            "per-channel weights)"
        )
    if method is None:
        return "quantization=none"
    return f"quantization={method} (per-channel weights, quantized at load)"
