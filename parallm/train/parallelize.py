"""Apply parallelism to the engine's model from outside, in a fixed order.

1. tensor parallel (DTensor plans on mesh dim "tp"),
2. activation checkpointing per decoder layer,
3. ``torch.compile`` per decoder layer,
4. FSDP2 ``fully_shard`` on mesh dim "dp" with a mixed-precision policy.

Nothing here renames a parameter, so checkpoints and exports see the Hugging Face names whatever
combination is on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from parallm.train.config import ParallelSection

# Column-parallel projections split heads (or MLP channels) across ranks; their local outputs
# feed the row-parallel projection directly. The attention reshape `.view(*lead, -1, head_dim)`
# infers the local head count, so rotary embedding and SDPA run on each rank's heads unchanged.
_LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel,
    "self_attn.k_proj": ColwiseParallel,
    "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


def compute_dtype(cfg: ParallelSection, device_type: str) -> torch.dtype:
    """The forward/backward dtype: bf16 on CUDA, fp32 on CPU unless set explicitly."""
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.mixed_precision == "bfloat16" else torch.float32


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelSection) -> nn.Module:
    """Shard ``model`` (a ``LlamaForCausalLM``) in place over ``mesh`` and return it."""
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    layers = list(model.model.layers)
    if cfg.activation_checkpointing:
        for layer in layers:
            checkpoint_activations(layer)
    if cfg.compile:
        for layer in layers:
            # In place (nn.Module.compile), unlike torch.compile(m), so names keep no `_orig_mod`.
            # Not fullgraph: FSDP's hooks, added next, run outside the compiled graph.
            layer.compile()
    apply_fsdp(model, mesh["dp"], compute_dtype(cfg, mesh.device_type))
    return model


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP: column/row pairs in attention and MLP, vocab-sharded embedding/head."""
    parallelize_module(
        model,
        tp_mesh,
        {
            # Each rank looks up its vocabulary slice; the partial sums are all-reduced.
            "model.embed_tokens": RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Replicate()
            ),
            # Logits are gathered over the vocabulary so the loss sees ordinary tensors.
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    if model.config.tie_word_embeddings:
        # Both plans shard the shared weight on dim 0 (vocab); point the head back at the
        # embedding's DTensor so the two stay one parameter.
        model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.model.layers:
        plan = {name: style() for name, style in _LAYER_PLAN.items()}
        parallelize_module(layer, tp_mesh, plan)


def checkpoint_activations(layer: nn.Module) -> None:
    """Recompute ``layer``'s activations in backward instead of storing them.

    The instance's ``forward`` is wrapped rather than the module, so parameter names are
    untouched (checkpoint wrappers add a prefix).
    """
    forward = layer.forward

    def checkpointed_forward(*args: object, **kwargs: object) -> torch.Tensor:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed_forward


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """ZeRO-3 style sharding: one FSDP unit per decoder layer plus the root (embeddings, head).

    Master weights and optimizer state stay fp32; compute runs in ``param_dtype`` and gradients
    are reduced in fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again first in backward: keep them gathered.
        fully_shard(
            layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1
        )
    # The root stays gathered after forward: `compute_logits` calls the LM head outside forward.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
