"""Linear and embedding layers load their tensor-parallel slice (and a packed layer its rows)
from full checkpoint tensors: the ranks' results add up, or concatenate, to the full layer's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from parallm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

HIDDEN, HEAD_DIM = 32, 8


def _load(layer, tensor, shard_id=None, name="weight"):
    param = getattr(layer, name)
    with torch.no_grad():
        param.weight_loader(param, tensor, shard_id)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_parallel_shards_concatenate_to_the_full_output(tp_size):
    w, b, x = _randn(16, HIDDEN, seed=0), _randn(16, seed=1), _randn(3, HIDDEN, seed=2)
    parts = []
    for rank in range(tp_size):
        layer = ColumnParallelLinear(HIDDEN, 16, bias=True, tp_rank=rank, tp_size=tp_size)
        _load(layer, w)
        _load(layer, b, name="bias")
        parts.append(layer(x))
    torch.testing.assert_close(torch.cat(parts, dim=-1), F.linear(x, w, b))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_parallel_partial_sums_add_up_to_the_full_output(tp_size):
    w, x = _randn(12, HIDDEN, seed=3), _randn(3, HIDDEN, seed=4)
    per = HIDDEN // tp_size
    total = torch.zeros(3, 12)
    for rank in range(tp_size):
        layer = RowParallelLinear(HIDDEN, 12, tp_rank=rank, tp_size=tp_size)
        _load(layer, w)
        total += layer(x[:, rank * per : (rank + 1) * per])
    torch.testing.assert_close(total, F.linear(x, w))


def test_row_parallel_bias_counts_once_in_the_sum():
    """Only rank 0 holds the bias, so the all-reduced sum adds it once."""
    w, b, x = _randn(12, HIDDEN, seed=5), _randn(12, seed=6), _randn(3, HIDDEN, seed=7)
    per = HIDDEN // 2
    total = torch.zeros(3, 12)
    for rank in range(2):
        layer = RowParallelLinear(HIDDEN, 12, bias=True, tp_rank=rank, tp_size=2)
        _load(layer, w)
        _load(layer, b, name="bias")
        total += layer(x[:, rank * per : (rank + 1) * per])
    torch.testing.assert_close(total, F.linear(x, w, b))


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "tp_size"), [(4, 2, 1), (4, 2, 2), (8, 2, 4)]
)
def test_qkv_packs_each_ranks_heads(num_heads, num_kv_heads, tp_size):
    """Rank r's packed output is [its q heads, its k heads, its v heads]; with fewer KV heads
    than ranks, each KV head is replicated on tp_size / num_kv_heads ranks."""
    q_w = _randn(num_heads * HEAD_DIM, HIDDEN, seed=5)
    k_w = _randn(num_kv_heads * HEAD_DIM, HIDDEN, seed=6)
    v_w = _randn(num_kv_heads * HEAD_DIM, HIDDEN, seed=7)
    x = _randn(2, HIDDEN, seed=8)
    full_q, full_k, full_v = (F.linear(x, w).view(2, -1, HEAD_DIM) for w in (q_w, k_w, v_w))
    for rank in range(tp_size):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads, num_kv_heads, tp_rank=rank,
                                  tp_size=tp_size)  # fmt: skip
        for shard_id, w in (("q", q_w), ("k", k_w), ("v", v_w)):
            _load(layer, w, shard_id)
        q, k, v = (t.view(2, -1, HEAD_DIM) for t in layer(x).split(layer.output_sizes, -1))
        q_heads = num_heads // tp_size
        kv_heads = k.shape[1]
        replicas = max(1, tp_size // num_kv_heads)
        kv_head = (rank // replicas) * kv_heads
        torch.testing.assert_close(q, full_q[:, rank * q_heads : (rank + 1) * q_heads])
        torch.testing.assert_close(k, full_k[:, kv_head : kv_head + kv_heads])
        torch.testing.assert_close(v, full_v[:, kv_head : kv_head + kv_heads])


def test_merged_column_parallel_fills_gate_then_up():
    gate, up, x = (
        _randn(12, HIDDEN, seed=9),
        _randn(12, HIDDEN, seed=10),
        _randn(2, HIDDEN, seed=11),
    )
    for rank in range(2):
        layer = MergedColumnParallelLinear(HIDDEN, [12, 12], tp_rank=rank, tp_size=2)
        _load(layer, gate, 0)
        _load(layer, up, 1)
        got_gate, got_up = layer(x).chunk(2, dim=-1)
        torch.testing.assert_close(got_gate, F.linear(x, gate)[:, rank * 6 : (rank + 1) * 6])
        torch.testing.assert_close(got_up, F.linear(x, up)[:, rank * 6 : (rank + 1) * 6])


def test_vocab_parallel_embedding_and_head_split_the_vocabulary():
    vocab = 11  # not a multiple of 2: the last rank holds a padding row
    table, ids = _randn(vocab, HIDDEN, seed=12), torch.tensor([0, 5, 6, 10])
    h = _randn(3, HIDDEN, seed=13)
    looked_up, logits = torch.zeros(4, HIDDEN), []
    for rank in range(2):
        embed = VocabParallelEmbedding(vocab, HIDDEN, tp_rank=rank, tp_size=2)
        head = ParallelLMHead(HIDDEN, vocab, tp_rank=rank, tp_size=2)
        _load(embed, table)
        _load(head, table)
        looked_up += embed(ids)
        logits.append(head(h))
    torch.testing.assert_close(looked_up, table[ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :vocab], F.linear(h, table))


def test_bad_shapes_and_shard_ids_are_named():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2)
    with pytest.raises(
        ValueError, match=r"k_proj: checkpoint shape \(8, 32\), expected \(16, 32\)"
    ):
        _load(layer, torch.zeros(8, HIDDEN), "k")
    with pytest.raises(ValueError, match="shard_id must be one of"):
        _load(layer, torch.zeros(16, HIDDEN), "x")
    with pytest.raises(ValueError, match="num_attention_heads"):
        QKVParallelLinear(HIDDEN, HEAD_DIM, 3, 1, tp_size=2)
    with pytest.raises(ValueError, match="out_features"):
        ColumnParallelLinear(HIDDEN, 10, tp_size=4)
