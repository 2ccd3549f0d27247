"""The engine's model, built for training and initialised reproducibly."""

from __future__ import annotations

import math

import torch
from torch import nn

from parallm.config import ModelConfig
from parallm.models.loader import build_model


@torch.no_grad()
def init_weights(model: nn.Module, std: float, num_layers: int) -> None:
    """GPT-2 style init: N(0, std) weights, output projections scaled down by sqrt(2 x layers).

    Scaling the projections that write into the residual stream keeps its variance flat as
    depth grows. Parameters are visited in a fixed order, so one seed gives one model.
    """
    residual_std = std / math.sqrt(2 * num_layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            param.normal_(0.0, residual_std)
        else:
            param.normal_(0.0, std)


def build_train_model(
    cfg: ModelConfig, max_positions: int, device: torch.device, std: float, seed: int
) -> nn.Module:
    """A float32 ``LlamaForCausalLM`` on ``device``, initialised from ``seed`` (same on all ranks)."""
    torch.manual_seed(seed)
    model = build_model(cfg, torch.float32, device, max_positions)
    init_weights(model, std, cfg.num_hidden_layers)
    return model.train()
