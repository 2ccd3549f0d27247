"""The Llama decoder family: Llama 2/3, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

One forward path for serving and training. The model sees flat packed tokens ``[T]`` plus a
``ForwardContext`` when serving, or ``[B, S]`` batches with no context when training; the
attention layer picks the step's backend or dense causal attention. Everything else (Triton
layers, the graph-captured decode step, parallelism) is applied to it from outside.

Parameter names are those of the Hugging Face checkpoints. Built with ``packed=True`` (serving),
q/k/v and gate/up are one GEMM each (``qkv_proj``, ``gate_up_proj``), filled from the
checkpoint's separate tensors by their per-shard loaders (``packed_modules_mapping``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallm.config import ModelConfig
from parallm.layers.activation import SiluAndMul
from parallm.layers.attention import Attention, ForwardContext
from parallm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from parallm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from parallm.layers.norm import RMSNorm
from parallm.layers.rotary import RopeTables, RotaryEmbedding


def _join_partial_sums(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Row-parallel outputs and vocabulary-shard embeddings add up across the ranks (the
    default ``torch.distributed`` group); every rank runs the same forward."""
    if tp_size > 1:
        dist.all_reduce(x)
    return x


class LlamaAttention(nn.Module):
    """Multi-head attention with grouped KV heads and optional q/k RMSNorm."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, packed: bool, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.tp_size = tp_size
        h, d, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        if packed:
            self.qkv_proj = QKVParallelLinear(
                h, d, self.num_heads, self.num_kv_heads, bias, tp_rank, tp_size
            )
            # This rank's heads (KV heads replicated when there are fewer than ranks).
            self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        elif tp_size > 1:
            raise ValueError("tensor parallelism needs the packed (serving) model")
        else:
            self.q_proj = ColumnParallelLinear(h, self.num_heads * d, bias=bias)
            self.k_proj = ColumnParallelLinear(h, self.num_kv_heads * d, bias=bias)
            self.v_proj = ColumnParallelLinear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * d, h, bias=False, tp_rank=tp_rank, tp_size=tp_size
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = Attention(layer_idx, d**-0.5)

    def forward(
        self, x: torch.Tensor, rope: RopeTables, ctx: ForwardContext | None
    ) -> torch.Tensor:
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        else:
            qkv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        lead = x.shape[:-1]
        q, k, v = (t.view(*lead, -1, self.head_dim) for t in qkv)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, rope, ctx)
        # -1: the local heads when tensor parallelism shards them.
        return _join_partial_sums(self.o_proj(out.reshape(*lead, -1)), self.tp_size)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, cfg: ModelConfig, packed: bool, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_size = tp_size
        h, i = cfg.hidden_size, cfg.intermediate_size
        if packed:
            self.gate_up_proj = MergedColumnParallelLinear(
                h, [i, i], tp_rank=tp_rank, tp_size=tp_size
            )
        else:
            self.gate_proj = ColumnParallelLinear(h, i)
            self.up_proj = ColumnParallelLinear(h, i)
        self.down_proj = RowParallelLinear(i, h, tp_rank=tp_rank, tp_size=tp_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            out = self.down_proj(self.act_fn(self.gate_up_proj(x)))
        else:
            out = self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))
        return _join_partial_sums(out, self.tp_size)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residual connections."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, packed: bool, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, packed, tp_rank, tp_size)
        self.mlp = LlamaMLP(cfg, packed, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        ctx: ForwardContext | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it is added).

        Keeping the residual separate lets the next norm add it in the same pass.
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        out = self.mlp(h)
        if ctx is None and torch.is_grad_enabled():
            # Training: FSDP2 hooks this layer's outputs for backward, and an output that is a
            # view (tensor parallelism's all-reduced down_proj is one) would lose that hook to
            # any later in-place op, silently skipping an all-gather. Outputs own their storage.
            out = out.clone()
        return out, residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and the final norm (Hugging Face's ``model.*`` prefix)."""

    def __init__(
        self, cfg: ModelConfig, max_positions: int, packed: bool, tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size
        )
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, packed, tp_rank, tp_size) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext | None
    ) -> torch.Tensor:
        x = _join_partial_sums(self.embed_tokens(input_ids), self.embed_tokens.tp_size)
        rope = self.rotary_emb.lookup(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, ctx)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; covers every architecture in ``SUPPORTED_ARCHITECTURES``."""

    # Checkpoint tensor name part -> (packed module name, shard id), for ``packed=True``.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int | None = None,
        packed: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        """``tp_rank``/``tp_size``: this rank's shard of a tensor-parallel model (Megatron
        style: q/k/v and gate/up split by columns, o and down by rows, the vocabulary split)."""
        super().__init__()
        self.config = cfg
        self.packed = packed
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.model = DecoderModel(
            cfg, max_positions or cfg.max_position_embeddings, packed, tp_rank, tp_size
        )
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp_rank, tp_size)
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
        """LM head over the selected hidden states: the whole vocabulary on every rank."""
        head = self.lm_head
        logits = head(hidden)
        if head.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(head.tp_size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[..., : head.vocab_size]
