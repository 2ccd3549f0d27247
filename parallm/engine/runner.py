"""The model runner: turns a ScheduledBatch into tensors, runs the model and samples.

It owns the KV cache tensors and the attention backend. It decides nothing: the
scheduler has already chosen which tokens of which sequences this step computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from parallm.config import CacheConfig, ModelConfig
from parallm.engine.sampler import Sampler, SamplerOutput, SamplingRow, SamplingTensors
from parallm.engine.scheduler import ScheduledBatch
from parallm.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    ReferenceAttention,
)

_CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass
class StepInputs:
    """Host-side flat arrays for one step."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    sample_indices: np.ndarray  # row of the hidden state that each sampling sequence samples from


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    return per_token * block_size


class ModelRunner:
    """Executes scheduled steps on one device."""

    def __init__(
        self,
        model: nn.Module,
        model_cfg: ModelConfig,
        cache_cfg: CacheConfig,
        device: torch.device,
        dtype: torch.dtype,
        backend: AttentionBackend | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.model = model
        self.model_cfg = model_cfg
        self.cache_cfg = cache_cfg
        self.device = device
        self.dtype = dtype
        self.backend = backend or ReferenceAttention()
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids
        self.kv_caches: list[torch.Tensor] = []

    @property
    def block_size(self) -> int:
        return self.cache_cfg.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One ``[2, num_blocks, block_size, Hkv, D]`` tensor per layer."""
        cfg = self.model_cfg
        shape = (2, num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            torch.empty(shape, dtype=self.dtype, device=self.device)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.cache_cfg.num_blocks = num_blocks

    def plan_num_blocks(self, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """How many blocks fit: a byte budget on CPU, the measured free card on CUDA."""
        per_block = kv_bytes_per_block(self.model_cfg, self.block_size, self.dtype)
        if self.cache_cfg.kv_cache_memory is not None:
            return int(self.cache_cfg.kv_cache_memory // per_block)
        if self.device.type != "cuda":
            return _CPU_DEFAULT_KV_BYTES // per_block
        peak = self.profile_peak_memory(max_num_batched_tokens, max_num_seqs)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory that other processes or the CUDA context hold counts against the fraction.
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.cache_cfg.gpu_memory_utilization - peak - others
        return max(0, int(budget // per_block))

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int) -> int:
        """Peak bytes of weights plus the activations of the largest step we may run."""
        num_tokens = max(num_tokens, num_seqs)
        blocks = -(-num_tokens // self.block_size) + 1
        self.allocate_kv_cache(blocks)
        torch.cuda.reset_peak_memory_stats(self.device)
        meta = self._build_metadata(self._dummy_inputs(num_tokens))
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        ctx = ForwardContext(meta, self.kv_caches, self.backend)
        hidden = self.model(ids, positions, ctx)
        self.model.compute_logits(hidden[:num_seqs]).float()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        kv = sum(t.numel() * t.element_size() for t in self.kv_caches)
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak - kv

    def _dummy_inputs(self, num_tokens: int) -> StepInputs:
        num_blocks = -(-num_tokens // self.block_size)
        return StepInputs(
            input_ids=np.zeros(num_tokens, dtype=np.int64),
            positions=np.arange(num_tokens, dtype=np.int64),
            slot_mapping=np.arange(num_tokens, dtype=np.int64),
            query_start_loc=np.array([0, num_tokens], dtype=np.int32),
            seq_lens=np.array([num_tokens], dtype=np.int32),
            block_tables=np.arange(num_blocks, dtype=np.int32)[None, :],
            sample_indices=np.array([num_tokens - 1], dtype=np.int64),
        )

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch: token ids, positions, slots, query offsets, block tables."""
        bs = self.block_size
        ids, positions, slots, seq_lens = [], [], [], []
        query_start = [0]
        sample_indices = []
        width = max(len(item.seq.block_table) for item in batch.seqs)
        block_tables = np.zeros((len(batch.seqs), width), dtype=np.int32)
        for row, item in enumerate(batch.seqs):
            seq, start, n = item.seq, item.start, item.num_new_tokens
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[row, : len(table)] = table
            pos = np.arange(start, start + n, dtype=np.int64)
            ids.append(np.asarray(seq.token_ids[start : start + n], dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            if item.samples:
                sample_indices.append(query_start[-1] - 1)
        return StepInputs(
            input_ids=np.concatenate(ids),
            positions=np.concatenate(positions),
            slot_mapping=np.concatenate(slots),
            query_start_loc=np.asarray(query_start, dtype=np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_tables=block_tables,
            sample_indices=np.asarray(sample_indices, dtype=np.int64),
        )

    def _build_metadata(self, inputs: StepInputs) -> AttentionMetadata:
        query_lens = np.diff(inputs.query_start_loc)
        return AttentionMetadata(
            slot_mapping=self._to_device(inputs.slot_mapping),
            query_start_loc=self._to_device(inputs.query_start_loc),
            seq_lens=self._to_device(inputs.seq_lens),
            block_tables=self._to_device(inputs.block_tables),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(inputs.seq_lens.max()),
            query_start_loc_cpu=inputs.query_start_loc.tolist(),
            seq_lens_cpu=inputs.seq_lens.tolist(),
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Run one step; returns one sampled token per sampling sequence, in batch order."""
        inputs = self.prepare(batch)
        logits = self.forward_logits(inputs)
        if logits is None:
            return None
        rows = [self._sampling_row(item.seq) for item in batch.seqs if item.samples]
        tensors = SamplingTensors.build(rows, self.model_cfg.vocab_size, self.device)
        return self.sampler(logits, tensors)

    def forward_logits(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits (float32) at the sampling rows, or None when no sequence samples."""
        meta = self._build_metadata(inputs)
        ctx = ForwardContext(meta, self.kv_caches, self.backend)
        ids = self._to_device(inputs.input_ids)
        positions = self._to_device(inputs.positions)
        hidden = self.model(ids, positions, ctx)
        if len(inputs.sample_indices) == 0:
            return None
        hidden = hidden[self._to_device(inputs.sample_indices)]
        return self.model.compute_logits(hidden).float()

    def _sampling_row(self, seq) -> SamplingRow:  # noqa: ANN001 - Sequence, kept light
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids)
            if not params.ignore_eos:
                banned += list(self.eos_token_ids)
        return SamplingRow(
            params=params,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            generator=seq.generator,
            banned_token_ids=banned,
        )
