"""Checkpoints stored quantized: what their ``quantization_config`` (config.json) says, and how
their weights become the runtime's format (one float32 scale per output row).

Read (vLLM's names):

- ``quant_method: "fp8"`` (vLLM's and transformers' fp8 checkpoints): e4m3 ``weight`` with
  ``weight_scale`` (per tensor) or, with ``weight_block_size: [bn, bk]`` (Qwen3-FP8,
  DeepSeek-V3), ``weight_scale_inv`` per ``bn x bk`` block (multiplied like ``weight_scale``
  despite its name). ``activation_scheme`` ``"dynamic"`` or ``"static"``.
- ``quant_method: "compressed-tensors"`` (llm-compressor): ``format`` ``"float-quantized"``
  (e4m3) or ``"int-quantized"`` (int8), symmetric 8-bit weights with ``weight_scale`` per
  ``tensor``, ``channel`` or ``block`` (``block_structure``).

Per-tensor and per-channel scales become per-row scales exactly (the stored values are kept).
Block scales are dequantized and the weight requantized per row at load (a second rounding:
the runtime's GEMMs and GEMVs take one scale per row). Activations are never quantized with the
checkpoint's static ``input_scale``: fp8 GEMMs quantize them per token at run time, int8 GEMMs
are weight-only; ``input_scale`` and KV-cache scales (``k_scale``, ``v_scale``) are skipped.
A layer whose checkpoint tensors carry no scale (``ignore``, ``modules_to_not_convert``) stays
float. Anything else is refused by name, before the model is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallm.layers.quantization.format import WeightFormat
from parallm.layers.quantization.fp8 import FP8
from parallm.layers.quantization.int8 import INT8
from parallm.layers.quantization.linear import (
    QUANTIZED_CLASSES,
    QuantizedCheckpointTensor,
    QuantizedLinear,
)

CHECKPOINT_METHODS = ("fp8", "compressed-tensors")
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
# Stored next to the weights, never read: static activation and KV-cache scales, and the zero
# points some writers store for symmetric schemes (the config is checked to be symmetric).
SKIPPED_SUFFIXES = (".input_scale", ".k_scale", ".v_scale", ".kv_scale", ".weight_zero_point",
                    ".input_zero_point")  # fmt: skip
_CT_FORMATS = {"float-quantized": FP8, "int-quantized": INT8}
_CT_STRATEGIES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class StoredQuantization:
    """A checkpoint's quantized weights: the quant_method, the runtime format its values load
    into, and the block shape of block-wise scales (None: per-tensor or per-channel)."""

    method: str
    weight_format: WeightFormat
    block_size: tuple[int, int] | None = None

    def is_scale(self, name: str) -> bool:
        return name.endswith(SCALE_SUFFIXES)

    def is_skipped(self, name: str) -> bool:
        return name.endswith(SKIPPED_SUFFIXES)


def stored_quantization(raw_config: Mapping[str, Any]) -> StoredQuantization | None:
    """The checkpoint's ``quantization_config`` read and checked; None for a float checkpoint.
    A form this runtime cannot load is a ValueError naming the field and what is supported."""
    quant = raw_config.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, Mapping):
        raise ValueError(f"quantization_config must be an object, got {type(quant).__name__}")
    method = quant.get("quant_method")
    if method == "fp8":
        return _fp8_config(quant)
    if method == "compressed-tensors":
        return _compressed_tensors_config(quant)
    raise ValueError(
        f"quantization_config quant_method {method!r} is not supported; checkpoints stored "
        f"quantized load from quant_method {list(CHECKPOINT_METHODS)} (8-bit weights), or load "
        "the float checkpoint with quantization='fp8' or 'int8' to quantize at load"
    )


def _fp8_config(quant: Mapping[str, Any]) -> StoredQuantization:
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config activation_scheme must be 'dynamic' or 'static' "
                         f"(quant_method 'fp8'), got {scheme!r}")  # fmt: skip
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config fmt must be 'e4m3' (quant_method 'fp8'), "
                         f"got {fmt!r}")  # fmt: skip
    block = quant.get("weight_block_size")
    return StoredQuantization("fp8", FP8, _block_size(block, "weight_block_size"))


def _compressed_tensors_config(quant: Mapping[str, Any]) -> StoredQuantization:
    where = "quantization_config (quant_method 'compressed-tensors')"
    fmt = quant.get("format")
    if fmt not in _CT_FORMATS:
        raise ValueError(f"{where} format must be one of {list(_CT_FORMATS)} (8-bit weights), "
                         f"got {fmt!r}")  # fmt: skip
    if quant.get("sparsity_config"):
        raise ValueError(f"{where} sparsity_config is not supported")
    status = quant.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{where} quantization_status must be 'compressed', got {status!r}")
    groups = quant.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"{where} needs config_groups")
    blocks = {_ct_weights(name, group, fmt, where) for name, group in groups.items()}
    if len(blocks) > 1:
        raise ValueError(f"{where}: config_groups with different block_structure are not "
                         f"supported, got {sorted(map(str, blocks))}")  # fmt: skip
    return StoredQuantization("compressed-tensors", _CT_FORMATS[fmt], blocks.pop())


def _ct_weights(name: str, group: Any, fmt: str, where: str) -> tuple[int, int] | None:
    """One config group's weight scheme checked; its block shape (None unless block-wise)."""
    weights = group.get("weights") if isinstance(group, Mapping) else None
    field = f"{where} config_groups.{name}.weights"
    if not isinstance(weights, Mapping):
        raise ValueError(f"{field} is missing")
    want_type = "float" if fmt == "float-quantized" else "int"
    checks = {"num_bits": 8, "type": want_type, "symmetric": True, "dynamic": False}
    for key, want in checks.items():
        got = weights.get(key, want if key == "dynamic" else None)
        if got != want:
            raise ValueError(f"{field}.{key} must be {want!r} (format {fmt!r}), got {got!r}")
    strategy = weights.get("strategy")
    if strategy not in _CT_STRATEGIES:
        raise ValueError(f"{field}.strategy must be one of {list(_CT_STRATEGIES)}, "
                         f"got {strategy!r}")  # fmt: skip
    if strategy != "block":
        return None
    return _block_size(weights.get("block_structure"), f"{field}.block_structure", required=True)


def _block_size(value: Any, field: str, required: bool = False) -> tuple[int, int] | None:
    if value is None and not required:
        return None
    if (
        not isinstance(value, list | tuple) or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):  # fmt: skip
        raise ValueError(f"quantization_config {field} must be two positive integers "
                         f"[rows, cols], got {value!r}")  # fmt: skip
    return int(value[0]), int(value[1])


# --- weights --------------------------------------------------------------------------------


def runtime_weight(
    spec: StoredQuantization, name: str, values: Any, scale: torch.Tensor, param: torch.Tensor
) -> QuantizedCheckpointTensor | torch.Tensor:
    """The checkpoint weight ``name`` (``values [N, K]``, a tensor or an unread slice, and its
    stored ``scale``) as ``param``'s loader takes it. A quantized layer's weight (``param`` in
    the format's dtype) gets the runtime's per-row form: per-tensor and per-channel scales keep
    the stored values (a slice stays unread), block scales requantize the whole weight per row
    on the layer's device. A layer the runtime keeps float (the LM head) gets the weight
    dequantized, in ``param``'s dtype."""
    fmt = spec.weight_format
    if values.dtype != fmt.dtype:
        raise ValueError(f"checkpoint tensor {name!r} is {values.dtype}; quant_method "
                         f"{spec.method!r} stores {fmt.name} weights as {fmt.dtype}")  # fmt: skip
    if len(values.shape) != 2:
        raise ValueError(f"checkpoint tensor {name!r}: a quantized weight must be 2-D, "
                         f"got shape {tuple(values.shape)}")  # fmt: skip
    quantized = param.dtype == fmt.dtype
    rows, cols = values.shape
    scale = scale.float()
    if scale.numel() == 1 or (scale.numel() == rows and scale.shape in ((rows,), (rows, 1))):
        row_scales = scale.reshape(-1).expand(rows).contiguous()
        if quantized:
            return QuantizedCheckpointTensor(values, row_scales)
        return fmt.dequantize(_whole(values, param.device), row_scales.to(param.device),
                              param.dtype)  # fmt: skip
    if spec.block_size is not None:
        bn, bk = spec.block_size
        if tuple(scale.shape) == (math.ceil(rows / bn), math.ceil(cols / bk)):
            scale = scale.to(param.device)
            per_element = scale.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)
            w = _whole(values, param.device).float() * per_element[:, :cols]
            return QuantizedCheckpointTensor(*fmt.quantize(w)) if quantized else w.to(param.dtype)
    block = f", or per {list(spec.block_size)} block" if spec.block_size else ""
    raise ValueError(
        f"checkpoint tensor {name!r}: scale of shape {tuple(scale.shape)} does not fit the "
        f"weight {tuple(values.shape)}; supported: one per tensor, one per output row{block}"
    )


def _whole(values: Any, device: torch.device) -> torch.Tensor:
    """A checkpoint tensor read whole (from an unread slice if need be), on ``device``."""
    return (values if isinstance(values, torch.Tensor) else values.full()).to(device)


# --- the model ------------------------------------------------------------------------------


def quantize_stored_layers(
    model: nn.Module,
    spec: StoredQuantization,
    checkpoint_weights: Callable[[str, nn.Module], list[str]],
    scaled: Collection[str],
) -> int:
    """Turn each linear layer whose checkpoint weights all carry a scale into its quantized
    class, with empty values and scales for the loader to fill; returns how many.
    ``checkpoint_weights(name, module)``: a linear layer's checkpoint weight names (a packed
    layer has several); ``scaled``: the checkpoint weights that have a scale tensor."""
    scaled = set(scaled)
    count = 0
    for module_name, module in model.named_modules():
        if type(module) not in QUANTIZED_CLASSES:
            continue
        names = checkpoint_weights(module_name, module)
        stored = [n in scaled for n in names]
        if not any(stored):
            continue  # kept float by the checkpoint (ignore / modules_to_not_convert)
        if not all(stored):
            mixed = sorted(n for n in names if n not in scaled)
            raise ValueError(f"checkpoint: {mixed} stored float but packed into one layer "
                             f"with quantized {sorted(scaled & set(names))}")  # fmt: skip
        _empty_quantized(module, spec.weight_format)
        count += 1
    if count == 0:
        raise ValueError(
            f"checkpoint: quantization_config says quant_method {spec.method!r}, but no linear "
            f"layer's weight has a scale tensor ({' or '.join(s[1:] for s in SCALE_SUFFIXES)})"
        )
    return count


@torch.no_grad()
def _empty_quantized(module: nn.Module, fmt: WeightFormat) -> None:
    weight = module.weight
    module.__class__ = QUANTIZED_CLASSES[type(module)]
    module.weight_format = fmt
    module.weight = nn.Parameter(
        torch.empty(weight.shape, dtype=fmt.dtype, device=weight.device), requires_grad=False
    )
    module.register_buffer(
        "weight_scale", torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    )
    for param in module.parameters(recurse=False):
        param.weight_loader = module.weight_loader


def weight_format_name(model: nn.Module) -> str | None:
    """The format name of a model's quantized layers, or None for a float model."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            return module.weight_format.name
    return None
