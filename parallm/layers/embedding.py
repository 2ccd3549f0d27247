"""Token embedding and LM head, with their vocabulary split across tensor-parallel ranks.

Rank ``r`` of ``tp_size`` holds vocabulary rows ``[r * per_rank, (r + 1) * per_rank)``, the
vocabulary padded up to a multiple of ``tp_size`` (padding rows are zero and never chosen).
The embedding of an id another rank holds is zero here, so the ranks' outputs sum to the
full lookup; the LM head's logits are the rank's columns of the full logits. The model joins
them (an all-reduce, an all-gather; ``parallm/models/llama.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallm.layers.linear import ColumnParallelLinear


def _padded(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def _load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, vocab: int, rank: int) -> None:
    rows = param.shape[0]
    if tuple(loaded.shape) != (vocab, param.shape[1]):
        raise ValueError(f"vocabulary rows: checkpoint shape {tuple(loaded.shape)}, "
                         f"expected {(vocab, param.shape[1])}")  # fmt: skip
    start = rank * rows
    take = max(0, min(rows, vocab - start))
    param.zero_()
    if take:  # the last rank may hold only padding rows
        param[:take].copy_(loaded[start : start + take])


class VocabParallelEmbedding(nn.Embedding):
    """``nn.Embedding`` over this rank's vocabulary rows."""

    def __init__(
        self, vocab_size: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__(_padded(vocab_size, tp_size) // tp_size, embedding_dim)
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp_rank)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        start = self.tp_rank * self.num_embeddings
        local = input_ids - start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return out * mine.unsqueeze(-1).to(out.dtype)


class ParallelLMHead(ColumnParallelLinear):
    """The LM head: this rank's vocabulary rows of the output projection."""

    def __init__(self, hidden_size: int, vocab_size: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(hidden_size, _padded(vocab_size, tp_size), False, tp_rank, tp_size)
        self.vocab_size = vocab_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp_rank)
