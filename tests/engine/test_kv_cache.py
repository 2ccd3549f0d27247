"""Block allocator, reference counts, prefix hashing and LRU eviction."""

from __future__ import annotations

import pytest

from parallm.engine.kv_cache import KVCacheManager, block_hash
from parallm.engine.request import Sequence
from parallm.sampling_params import SamplingParams


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SamplingParams(), arrival_time=0.0)


def _admit(kv: KVCacheManager, seq: Sequence) -> list[int]:
    hits = kv.lookup_prefix(seq)
    assert kv.allocate(seq, seq.num_tokens - len(hits) * kv.block_size, hits)
    kv.commit_full_blocks(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    return hits


def test_hash_chains_on_the_parent():
    a = block_hash(b"", [1, 2, 3, 4])
    assert a == block_hash(b"", [1, 2, 3, 4])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(b"", [5, 6, 7, 8])


def test_allocation_and_free_return_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = _seq(list(range(10)))
    _admit(kv, seq)
    assert len(seq.block_table) == 3 and kv.num_free_blocks == 5
    assert kv.allocate(seq, 2)  # tokens 10, 11 still fit in block 3
    assert len(seq.block_table) == 3
    assert kv.allocate(seq, 3)
    assert len(seq.block_table) == 4
    kv.free(seq)
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 0


def test_allocation_fails_without_side_effects_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=True)
    seq = _seq(list(range(12)))
    assert not kv.allocate(seq, 12)
    assert seq.block_table == [] and kv.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    first = _seq(list(range(10)))
    _admit(kv, first)
    second = _seq(list(range(8)) + [99, 98, 97])
    hits = _admit(kv, second)
    assert hits == first.block_table[:2]
    assert second.num_cached_tokens == 8
    assert kv.blocks[hits[0]].ref_count == 2
    kv.free(first)
    assert kv.blocks[hits[0]].ref_count == 1
    kv.free(second)
    assert kv.num_free_blocks == 10 and kv.num_cached_blocks == 2  # the shared full blocks


def test_never_matches_the_whole_sequence():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    _admit(kv, _seq(list(range(8))))
    again = _seq(list(range(8)))
    assert len(kv.lookup_prefix(again)) == 1  # the last token must be computed for logits


def test_freed_cached_blocks_are_reused_and_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    old = _seq(list(range(9)))
    _admit(kv, old)
    head, tail = old.block_table[:2]
    kv.free(old)
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 4
    # Uncached blocks go first; among cached ones the sequence's tail is evicted before its head.
    _admit(kv, _seq([50 + i for i in range(8)]))
    assert kv.num_cached_blocks == 4
    third = _seq([80 + i for i in range(4)])
    _admit(kv, third)
    assert third.block_table == [tail]
    probe = _seq(list(range(8)) + [1])
    assert kv.lookup_prefix(probe) == [head]


def test_reviving_a_cached_block_takes_it_off_the_free_queue():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    a = _seq(list(range(9)))
    _admit(kv, a)
    table = list(a.block_table)
    kv.free(a)
    b = _seq(list(range(8)) + [1])
    hits = _admit(kv, b)
    assert hits == table[:2]
    assert kv.num_free_blocks == 0  # 2 revived + 1 new


@pytest.mark.parametrize("caching", [True, False])
def test_reset_prefix_cache(caching):
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=caching)
    s = _seq(list(range(9)))
    _admit(kv, s)
    kv.free(s)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert kv.lookup_prefix(_seq(list(range(9)))) == []
