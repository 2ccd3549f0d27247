"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from parallm.config import SUPPORTED_ARCHITECTURES, ModelConfig
from parallm.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The class that implements ``cfg.architecture``; unknown names list the supported ones."""
    try:
        return _REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"architecture {cfg.architecture!r} is not supported; supported: {sorted(_REGISTRY)}"
        ) from None
