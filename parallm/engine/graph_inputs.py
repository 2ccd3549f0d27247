"""What the graph-captured steps share (decode: ``decode_graph.py``; verify: ``verify_graph.py``):
the layout of their static input region, and the setting and attention metadata that their
captured forwards read.

A captured graph reads its inputs from fixed device addresses, so each graph size or shape
owns one int32 region that a step's inputs are copied into in one transfer: int64 token rows
(ids, positions, slots, ...), then int32 per-sequence rows (seq_lens, ...), then, where they
travel in the same copy, the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from parallm.layers.attention import AttentionBackend, AttentionMetadata


@dataclass(frozen=True)
class InputRegion:
    """The layout of one int32 region: ``token_rows`` int64 rows of ``num_tokens``, then
    ``seq_rows`` int32 rows of ``batch``, then the block tables ``[batch, table_columns]``
    (none when ``table_columns`` is 0). Its views work on the device region and on a host
    copy of it alike (torch tensors or numpy arrays)."""

    token_rows: int
    num_tokens: int
    seq_rows: int
    batch: int
    table_columns: int = 0

    @property
    def token_words(self) -> int:
        return 2 * self.token_rows * self.num_tokens

    @property
    def head_words(self) -> int:
        """Int32 words before the block tables."""
        return self.token_words + self.seq_rows * self.batch

    @property
    def words(self) -> int:
        return self.head_words + self.batch * self.table_columns

    def tokens(self, words):
        """The token rows, ``[token_rows, num_tokens]`` int64."""
        part = words[: self.token_words]
        if isinstance(part, np.ndarray):
            return part.view(np.int64).reshape(self.token_rows, self.num_tokens)
        return part.view(torch.int64).view(self.token_rows, self.num_tokens)

    def per_seq(self, words):
        """The per-sequence rows, ``[seq_rows, batch]`` int32."""
        return words[self.token_words : self.head_words].reshape(self.seq_rows, self.batch)

    def tables(self, words):
        """The block tables, ``[batch, table_columns]`` int32."""
        return words[self.head_words : self.words].reshape(self.batch, self.table_columns)

    def allocate(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.words, dtype=torch.int32, device=device)


class GraphedSteps:
    """The setting every captured step of one kind shares: the model and its attention
    backend and KV caches, the block table width and longest sequence it was captured for,
    and the scratch block that padding rows store into (no sequence owns it)."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.max_blocks = max_blocks_per_seq
        self.max_seq_len = max_seq_len
        self.scratch_block = scratch_block
        self.block_size = block_size
        self.device = device

    def static_metadata(
        self, buf, query_start_loc: torch.Tensor, tokens_per_seq: int, seq_lens_cpu: list[int],
        **trees,
    ) -> AttentionMetadata:  # fmt: skip
        """The metadata of a step on ``buf``'s static inputs (``slot_mapping``, ``seq_lens``,
        ``block_tables``): ``len(seq_lens_cpu)`` sequences of ``tokens_per_seq`` tokens each,
        at most ``max_seq_len`` long (what the kernels are captured for); ``trees``: the tree
        mask's fields, if any."""
        num_tokens = tokens_per_seq * len(seq_lens_cpu)
        return AttentionMetadata(
            slot_mapping=buf.slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=buf.seq_lens,
            block_tables=buf.block_tables,
            max_query_len=tokens_per_seq,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(0, num_tokens + 1, tokens_per_seq)),
            seq_lens_cpu=seq_lens_cpu,
            **trees,
        )
