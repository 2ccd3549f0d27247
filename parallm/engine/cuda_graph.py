"""CUDA graphs for decode steps: capture once per batch size, replay with padded inputs.

A decode step of a small model is a few hundred short kernels; launching them one by one from
Python costs more than running them. A captured graph launches them all at once. Inputs are
copied into static buffers; rows past the real batch point at a scratch block that no sequence
owns, so padding never touches live KV entries.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

import numpy as np
import torch

from parallm.layers.attention import AttentionMetadata


class DecodeGraphs:
    """Owns the static input buffers and one captured graph per batch size."""

    def __init__(
        self,
        forward: Callable[
            [torch.Tensor, torch.Tensor, AttentionMetadata], tuple[torch.Tensor, torch.Tensor]
        ],
        sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.sizes = sorted(sizes)
        self.max_seq_len = max_seq_len
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.device = device
        n = self.sizes[-1]
        # Rows: input ids, positions, slots, so that a replay stages them in one copy.
        self.token_buf = torch.zeros(3, n, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.token_buf.unbind(0)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # logits, greedy ids
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[self.max_seq_len] * size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        self.slot_mapping.fill_(self.scratch_block * self.block_size)
        self.block_tables.fill_(self.scratch_block)
        pool = None
        for size in reversed(self.sizes):
            meta = self._metadata(size)
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self.forward(self.input_ids[:size], self.positions[:size], meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(self.input_ids[:size], self.positions[:size], meta)
            pool = graph.pool()
            self.graphs[size] = graph
            self.outputs[size] = out
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started

    def padded_size(self, batch: int) -> int | None:
        i = bisect.bisect_left(self.sizes, batch)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        device_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph for this batch; returns the logits and greedy token ids of the
        first ``len(input_ids)`` rows.

        ``device_ids`` (already on the GPU) replaces ``input_ids`` when the previous step's
        sampled tokens have not reached the host yet.
        """
        batch = len(input_ids)
        size = self.padded_size(batch)
        width = block_tables.shape[1]
        # Fresh pinned staging each step: the caching host allocator keeps a buffer from reuse
        # until its copy has run, so a step may be staged while the previous one is in flight.
        tokens = torch.empty((3, size), dtype=torch.long, pin_memory=True)
        lens = torch.ones(size, dtype=torch.int32, pin_memory=True)
        tables = torch.empty((size, width), dtype=torch.int32, pin_memory=True)
        tokens[0, :batch] = torch.from_numpy(input_ids)
        tokens[1, :batch] = torch.from_numpy(positions)
        tokens[2, :batch] = torch.from_numpy(slot_mapping)
        lens[:batch] = torch.from_numpy(seq_lens)
        tables[:batch] = torch.from_numpy(block_tables)
        # Padding rows: one token in the scratch block. Kernels read a row's table only up to
        # its length, so columns past `width` may hold stale ids and need no copy: that keeps
        # the per-step copy small when max_model_len (the table's full width) is large.
        tokens[0:2, batch:] = 0
        tokens[2, batch:] = self.scratch_block * self.block_size
        tables[batch:] = self.scratch_block
        self.token_buf[:, :size].copy_(tokens, non_blocking=True)
        if device_ids is not None:
            self.input_ids[:batch].copy_(device_ids)
        self.seq_lens[:size].copy_(lens, non_blocking=True)
        self.block_tables[:size, :width].copy_(tables, non_blocking=True)
        self.graphs[size].replay()
        logits, greedy = self.outputs[size]
        return logits[:batch], greedy[:batch]
