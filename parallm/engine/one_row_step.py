"""The batch-1 decode forward as one chain of Triton kernels over the model's weights.

A one-token step reads every weight once and does little else, so its time is the weight
stream plus the gaps between kernels. This plan runs each decoder layer as five kernels: the
RMSNorm (and residual add) inside the q/k/v GEMV, attention with rotary and the KV store
inside it, the o GEMV, the norm inside the gate/up GEMV and SiLU-and-mul inside the down GEMV;
the first q/k/v GEMV reads the token's embedding row itself, and the final norm and LM head
GEMV end the chain. Every kernel is Triton, so with ``pdl`` each one launches while its
predecessor drains (``parallm.kernels.pdl``); no cuBLAS call may enter the chain.

It reads the model's parameters and calls kernels; the model's own forward stays the plain
path. The decode graph (``parallm.engine.decode_graph``) captures it for batch 1.
"""

from __future__ import annotations

import torch
from torch import nn

from parallm.kernels import elementwise, gemv, paged_decode
from parallm.kernels.pdl import pdl_supported
from parallm.kernels.rope_store import NewTokenRope
from parallm.layers.attention import AttentionMetadata
from parallm.layers.backends import TritonAttention
from parallm.layers.quantization import QuantizedLinear
from parallm.layers.quantization.format import gemv_reads


def supports_one_row_step(model: nn.Module, backend: object) -> bool:
    """Whether :class:`OneRowStep` can run ``model``: packed projections without bias, one
    rank, and the Triton attention backend. Quantized projections (int8, e4m3 with per-row
    scales) are read as stored where the GEMVs read their dtype on this device."""
    if not getattr(model, "packed", False) or not isinstance(backend, TritonAttention):
        return False
    if not all(gemv_reads(m.weight.dtype, m.weight.device)
               for m in model.modules() if isinstance(m, QuantizedLinear)):  # fmt: skip
        return False
    embed = model.model.embed_tokens
    layer = model.model.layers[0]
    return embed.tp_size == 1 and layer.self_attn.qkv_proj.bias is None


class OneRowStep:
    """Logits of one decode row, computed by the kernel chain described above."""

    def __init__(self, model: nn.Module, backend: TritonAttention) -> None:
        self.model = model
        self.backend = backend  # owns the decode attention's split counters
        self.pdl = pdl_supported(model.lm_head.weight)

    def logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """``[1, vocab]`` logits of the token ``input_ids [1]`` at ``positions [1]``."""
        decoder = self.model.model
        rope = (decoder.rotary_emb.cos_cache, decoder.rotary_emb.sin_cache, positions)
        x, residual = decoder.embed_tokens.weight, None
        for i, layer in enumerate(decoder.layers):
            x, residual = self._layer(layer, x, residual, rope, meta, kv_caches[i], input_ids)
        hidden, _ = elementwise.fused_add_rms_norm(
            x, residual, decoder.norm.weight, decoder.norm.eps, pdl=self.pdl
        )
        return gemv.gemv(hidden, self.model.lm_head.weight, pdl=self.pdl)

    def _layer(
        self,
        layer: nn.Module,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        input_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer; ``x`` is the embedding table for the first (``residual`` None)."""
        attn, mlp, pdl = layer.self_attn, layer.mlp, self.pdl
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        gather = input_ids if residual is None else None
        qkv, summed = gemv.rms_norm_gemv(
            x, residual, norm1.weight, attn.qkv_proj.weight, norm1.eps, gather_ids=gather,
            pdl=pdl, weight_scale=_scale(attn.qkv_proj),
        )  # fmt: skip
        heads = self._attention(attn, qkv, rope, meta, kv_cache)
        h = gemv.gemv(heads.reshape(1, -1), attn.o_proj.weight, pdl=pdl,
                      weight_scale=_scale(attn.o_proj))  # fmt: skip
        gate_up, residual = gemv.rms_norm_gemv(
            h, summed, norm2.weight, mlp.gate_up_proj.weight, norm2.eps, pdl=pdl,
            weight_scale=_scale(mlp.gate_up_proj),
        )  # fmt: skip
        down = gemv.silu_mul_gemv(gate_up, mlp.down_proj.weight, pdl=pdl,
                                  weight_scale=_scale(mlp.down_proj))  # fmt: skip
        return down, residual

    def _attention(
        self,
        attn: nn.Module,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        d = attn.head_dim
        q, k, v = (t.view(1, -1, d) for t in qkv.split(attn.qkv_proj.output_sizes, dim=-1))
        if hasattr(attn, "q_norm"):
            q = elementwise.rms_norm(q, attn.q_norm.weight, attn.q_norm.eps, pdl=self.pdl)
            k = elementwise.rms_norm(k, attn.k_norm.weight, attn.k_norm.eps, pdl=self.pdl)
        new_token = NewTokenRope(k, v, *rope, meta.slot_mapping)
        return paged_decode.paged_decode_attention(
            q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, attn.attn.scale,
            meta.max_seq_len, rope=new_token, split_counters=self.backend.split_counters(q.device),
            kv_scale=attn.attn.kv_scale, pdl=self.pdl,
        )  # fmt: skip


def _scale(linear: nn.Module) -> torch.Tensor | None:
    """A quantized projection's per-row scales (its weight is read as stored); None for float."""
    return linear.weight_scale if isinstance(linear, QuantizedLinear) else None
