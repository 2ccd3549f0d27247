"""The Llama decoder family: Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Parameter names are those of the Hugging Face checkpoints, so loading, exporting and
resharding need no renaming tables. The model sees flat packed tokens ``[T]`` plus a
``ForwardContext`` when serving, or ``[B, S]`` batches with no context when training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallm.config import ModelConfig
from parallm.layers.attention import ForwardContext, dense_causal_attention
from parallm.layers.norm import RMSNorm
from parallm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and optional q/k RMSNorm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        h, d, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        # A plain attribute, not a submodule: one rotary table is shared by all layers.
        self._rotary = [rotary]

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext | None
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, -1, self.head_dim)
        k = self.k_proj(x).view(*lead, -1, self.head_dim)
        v = self.v_proj(x).view(*lead, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotary[0](positions, q, k)
        if ctx is None:
            out = dense_causal_attention(q, k, v, self.scale)
        else:
            kv_cache = ctx.kv_caches[self.layer_idx]
            out = ctx.backend.forward(q, k, v, kv_cache, ctx.meta, self.scale)
        return self.o_proj(out.reshape(*lead, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residual connections."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (Hugging Face's ``model.*`` prefix)."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rotary_emb) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext | None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; covers every architecture in ``SUPPORTED_ARCHITECTURES``."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions or cfg.max_position_embeddings)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        ctx: ForwardContext | None = None,
    ) -> torch.Tensor:
        """Hidden states. Without ``ctx``, input_ids is [B, S] and attention is causal per row."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            positions = positions.expand_as(input_ids)
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over the selected hidden states."""
        return self.lm_head(hidden)
