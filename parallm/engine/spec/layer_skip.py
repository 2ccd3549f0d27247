"""The draft of self-speculation (LayerSkip, Draft & Verify): the target's first layers.

``LayerSkipModel`` is a view over a loaded target (``LlamaForCausalLM``): its embeddings, its
first ``num_layers`` decoder layers, its final norm and its LM head, the same module objects
and so the same weights (nothing is copied). It has the target's attribute layout
(``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head``, ``packed``) and forward
signature, so a ``ModelRunner``, its CUDA graphs and the one-row kernel chain run it as they run
the target. Its attention layers keep their indices ``0 .. num_layers - 1``, which index the
draft's own KV cache of ``num_layers`` layers.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from parallm.config import ModelConfig
from parallm.models.llama import DecoderModel, LlamaForCausalLM


def check_num_layers(num_layers: int, target: ModelConfig) -> None:
    """The draft must skip at least one of the target's layers."""
    total = target.num_hidden_layers
    if num_layers >= total:
        raise ValueError(
            f"speculative_config.num_layers must be below the target's {total} layers "
            f"(1 to {total - 1}), got {num_layers}"
        )


class _DecoderPrefix(nn.Module):
    """A ``DecoderModel`` that runs only its first layers, over the target's modules."""

    forward = DecoderModel.forward  # embeddings, ``self.layers`` in order, final norm

    def __init__(self, decoder: DecoderModel, num_layers: int) -> None:
        super().__init__()
        self.embed_tokens = decoder.embed_tokens
        self.rotary_emb = decoder.rotary_emb
        self.layers = decoder.layers[:num_layers]  # a ModuleList of the same layer objects
        self.norm = decoder.norm


class LayerSkipModel(nn.Module):
    """The target's first ``num_layers`` layers with its final norm and LM head."""

    forward = LlamaForCausalLM.forward
    compute_logits = LlamaForCausalLM.compute_logits

    def __init__(self, target: LlamaForCausalLM, num_layers: int) -> None:
        super().__init__()
        check_num_layers(num_layers, target.config)
        self.config = dataclasses.replace(target.config, num_hidden_layers=num_layers)
        self.packed = target.packed
        self.model = _DecoderPrefix(target.model, num_layers)
        self.lm_head = target.lm_head
