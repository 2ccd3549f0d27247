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
from parallm.layers.rotary import RopeTables, RotaryEmbedding

# One CUDA row: the first layer's q/k/v GEMV gathers the embedding row (an A/B switch).
GATHER_EMBEDDING = True


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
        self,
        x: torch.Tensor | None,
        rope: RopeTables,
        ctx: ForwardContext | None,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``x``; or, when ``qkv`` is given, over that fused q/k/v projection."""
        out = self.attend(x, rope, ctx, qkv)
        return self.o_proj(out.reshape(*out.shape[:-2], -1))

    def attend(
        self,
        x: torch.Tensor | None,
        rope: RopeTables,
        ctx: ForwardContext | None,
        qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The heads' outputs [..., heads, head_dim] before the o projection."""
        if qkv is not None:
            lead = qkv.shape[:-1]
            q, k, v = self._split(qkv)
        else:
            lead = x.shape[:-1]
            q, k, v = self._project(x)
        q = q.view(*lead, -1, self.head_dim)
        k = k.view(*lead, -1, self.head_dim)
        v = v.view(*lead, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        rotary = self._rotary[0]
        if ctx is None:
            q, k = rotary.apply(rope, q, k)
            out = dense_causal_attention(q, k, v, self.scale)
        elif rotary.fused and hasattr(ctx.backend, "attend"):
            kv_cache = ctx.kv_caches[self.layer_idx]
            out = None
            if hasattr(ctx.backend, "rope_store_attend"):  # decode: all in the attention kernel
                tables = (rotary.cos_cache, rotary.sin_cache, rope.positions)
                out = ctx.backend.rope_store_attend(q, k, v, kv_cache, ctx.meta, self.scale, tables)
            if out is None:
                # One kernel rotates q and k and stores k and v; the backend only attends.
                q = rotary.apply_and_store(rope, q, k, v, kv_cache, ctx.meta.slot_mapping)
                out = ctx.backend.attend(q, kv_cache, ctx.meta, self.scale)
        else:
            q, k = rotary.apply(rope, q, k)
            kv_cache = ctx.kv_caches[self.layer_idx]
            out = ctx.backend.forward(q, k, v, kv_cache, ctx.meta, self.scale)
        return out.reshape(*lead, -1, self.head_dim)  # local heads under tensor parallelism

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv_proj"):
            return self._split(self.qkv_proj(x))
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)

    def fuse_projections(self) -> None:
        """One GEMM for q, k and v (inference only: the parameter names change)."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False  # set from outside (engine on CUDA) to use parallm.kernels.elementwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fused:
            from parallm.kernels import elementwise

            return self.down_proj(elementwise.silu_and_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """One GEMM for gate and up (inference only: the parameter names change)."""
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    bias = first.bias is not None
    out_features = sum(lin.out_features for lin in linears)
    fused = nn.Linear(first.in_features, out_features, bias=bias, device=first.weight.device,
                      dtype=first.weight.dtype)  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if bias:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residual connections."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Set from outside (engine on CUDA): a one-token step runs the norms inside the q/k/v
        # and gate/up GEMVs and SiLU-mul inside down (parallm.kernels.gemv).
        self.fused = False

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        ctx: ForwardContext | None,
        gather_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it is added).

        Keeping the residual separate lets the next norm add it in the same pass. With
        ``gather_ids`` (one CUDA row, :meth:`chains_one_row`), ``x`` is the embedding table
        and the first GEMV reads the row of that id itself.
        """
        if gather_ids is not None:  # x is the embedding table (DecoderModel.forward)
            return self._forward_one_row(x, residual, rope, ctx, gather_ids)
        one_row = ctx is not None and x.dim() == 2 and x.shape[0] == 1
        if self.fused and one_row and self._one_row_fusable():
            return self._forward_one_row(x, residual, rope, ctx)
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

    def chains_one_row(self, ctx: ForwardContext) -> bool:
        """Whether a one-row step of this layer is all Triton kernels launched with PDL (so a
        kernel after it may chain on with PDL too: no cuBLAS call in between)."""
        chained = getattr(ctx.backend, "pdl_safe", False) and self.self_attn._rotary[0].fused
        return self.fused and self._one_row_fusable() and chained

    def _one_row_fusable(self) -> bool:
        attn, mlp = self.self_attn, self.mlp
        qkv, gate_up = getattr(attn, "qkv_proj", None), getattr(mlp, "gate_up_proj", None)
        return qkv is not None and qkv.bias is None and gate_up is not None

    def _forward_one_row(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        ctx: ForwardContext,
        gather_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch-1 decode layer as six Triton kernels: the norms run inside the q/k/v and
        gate/up GEMVs and SiLU-mul inside down (measured faster than cuBLAS plus the separate
        kernel on Llama-3.2-1B shapes, benchmarks/RESULTS.md). With the Triton attention they
        chain with PDL (``parallm.kernels.pdl``): no cuBLAS call may sit between them."""
        from parallm.kernels.gemv import gemv, rms_norm_gemv, silu_mul_gemv
        from parallm.kernels.pdl import dependent_launches

        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        with dependent_launches(self.chains_one_row(ctx)):
            qkv, summed = rms_norm_gemv(x, residual, norm1.weight, attn.qkv_proj.weight,
                                        norm1.eps, gather_ids=gather_ids)  # fmt: skip
            residual = x if summed is None else summed
            h = gemv(attn.attend(None, rope, ctx, qkv=qkv).reshape(1, -1), attn.o_proj.weight)
            gate_up, residual = rms_norm_gemv(h, residual, norm2.weight, mlp.gate_up_proj.weight,
                                              norm2.eps)  # fmt: skip
            return silu_mul_gemv(gate_up, mlp.down_proj.weight), residual


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
        layers = iter(self.layers)
        if self._gathers_embedding(input_ids, ctx):
            # One CUDA row: the first q/k/v GEMV reads the token's embedding row itself.
            table = self.embed_tokens.weight
            rope = self.rotary_emb.lookup(positions, table.dtype)
            x, residual = next(layers)(table, None, rope, ctx, gather_ids=input_ids.view(1))
        else:
            x = self.embed_tokens(input_ids)
            rope = self.rotary_emb.lookup(positions, x.dtype)
            residual = None
        for layer in layers:
            x, residual = layer(x, residual, rope, ctx)
        return self.norm(x, residual)[0]

    def _gathers_embedding(self, input_ids: torch.Tensor, ctx: ForwardContext | None) -> bool:
        one_cuda_row = input_ids.numel() == 1 and input_ids.is_cuda and ctx is not None
        plain = type(self.embed_tokens) is nn.Embedding and GATHER_EMBEDDING
        return one_cuda_row and plain and self.layers[0].chains_one_row(ctx)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; covers every architecture in ``SUPPORTED_ARCHITECTURES``."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions or cfg.max_position_embeddings)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Set from outside (engine on CUDA): one row's logits come from the Triton GEMV, which
        # streams the LM head faster than cuBLAS (3.1 against 2.8 TB/s on an H100, RESULTS.md).
        self.fused = False

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

    def chains_one_row(self, input_ids: torch.Tensor, ctx: ForwardContext) -> bool:
        """Whether a step of these ids ends in a PDL chain of Triton kernels (one CUDA row, the
        fused one-row layers): the final norm and the LM head GEMV may then launch with PDL
        too (run them inside ``parallm.kernels.pdl.dependent_launches``)."""
        one_cuda_row = input_ids.numel() == 1 and input_ids.is_cuda and self.fused
        return one_cuda_row and self.model.layers[-1].chains_one_row(ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over the selected hidden states."""
        if self.fused and hidden.dim() == 2 and hidden.shape[0] == 1 and hidden.is_cuda:
            from parallm.kernels.gemv import gemv

            return gemv(hidden.contiguous(), self.lm_head.weight)
        return self.lm_head(hidden)

    def fuse_projections(self) -> None:
        """Serve with one GEMM for q/k/v and one for gate/up per layer (fewer, larger kernels)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def use_fused_kernels(self, enabled: bool = True) -> None:
        """Route norms, rotary and SiLU-mul through the Triton kernels of ``parallm.kernels.elementwise``."""
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = enabled
