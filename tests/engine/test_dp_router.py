"""The data-parallel router: longest cached prefix first, ties to the least loaded replica,
bounded memory, and finishes that lower the load."""

from __future__ import annotations

import pytest

from parallm.engine.dp_router import PrefixRouter, prefix_block_hashes
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence
from parallm.sampling_params import SamplingParams

BS = 4


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_hashes_are_the_kv_cache_managers():
    tokens = _tokens(7, 3 * BS + 1)
    seq = Sequence("r", 0, tokens, SamplingParams(), arrival_time=0.0)
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    kv.allocate(seq, len(tokens))
    kv.commit_full_blocks(seq, len(tokens))
    assert prefix_block_hashes(tokens, BS, 3) == seq.block_hashes[:3]
    assert len(set(seq.block_hashes[:3])) == 3


def test_a_request_goes_to_the_replica_with_the_longest_cached_prefix():
    router = PrefixRouter(3, BS, max_blocks_per_replica=100, max_imbalance=None)
    shared = _tokens(0, 2 * BS)
    assert router.route("a", shared + _tokens(100, 5)) == 0
    assert router.route("b", _tokens(200, 3 * BS)) == 1  # no hit anywhere: least loaded
    assert router.route("c", _tokens(300, 3 * BS)) == 2
    assert router.route("d", shared[:BS] + _tokens(400, 9)) == 0  # one block on 0
    assert router.route("e", shared + _tokens(500, 3)) == 0  # two blocks on 0, load 2
    assert router.load == [3, 1, 1]
    assert router.matched_blocks(0, shared + [1]) == 2
    assert router.matched_blocks(1, shared + [1]) == 0


def test_the_longest_match_wins_over_a_lower_load():
    router = PrefixRouter(2, BS, max_blocks_per_replica=100, max_imbalance=None)
    prompt = _tokens(0, 3 * BS + 1)
    assert router.route("a", prompt) == 0
    assert router.route("b", prompt) == 0  # replica 0 holds 3 blocks, replica 1 none
    assert router.load == [2, 0]


def test_the_last_token_never_counts_as_a_hit():
    """As in the cache manager: a prompt of exactly k blocks can hit only k - 1."""
    router = PrefixRouter(2, BS, max_blocks_per_replica=100, max_imbalance=None)
    router.route("a", _tokens(0, BS))
    assert router.matched_blocks(0, _tokens(0, BS)) == 0
    assert router.matched_blocks(0, _tokens(0, BS + 1)) == 1


def test_equal_matches_go_to_the_least_loaded_replica():
    router = PrefixRouter(3, BS, max_blocks_per_replica=100, max_imbalance=None)
    prefix = _tokens(0, BS)
    assert router.route("a", prefix + [1]) == 0
    assert router.route("b", _tokens(2000, 2)) == 1
    assert router.route("c", _tokens(3000, 2)) == 2
    router.finish("c", prefix + [9])  # replica 2 now caches the prefix block too
    assert router.load == [1, 1, 0]
    assert router.route("p", prefix + [5]) == 2  # a one-block match on 0 and 2: the idler
    assert router.route("q", prefix + [6]) == 0  # equal match, equal load: the lower index


def test_a_replica_too_far_above_the_least_loaded_takes_no_request_for_its_cache():
    router = PrefixRouter(2, BS, max_blocks_per_replica=100, max_imbalance=2)
    prompt = _tokens(0, 2 * BS + 1)
    got = [router.route(str(i), prompt) for i in range(6)]
    # Replica 0 caches the prefix and takes requests until it is 2 above replica 1; from
    # then on both cache it, and the less loaded one wins the tie.
    assert got == [0, 0, 0, 1, 1, 1]
    assert router.load == [3, 3]


def test_finish_lowers_the_load_and_is_idempotent():
    router = PrefixRouter(2, BS, max_blocks_per_replica=100)
    router.route("a", _tokens(0, 5))
    router.route("b", _tokens(50, 5))
    assert router.load == [1, 1]
    router.finish("a")
    router.finish("a")
    assert router.load == [0, 1]
    assert router.route("c", _tokens(90, 5)) == 0
    with pytest.raises(ValueError, match="request_id 'c' is already in flight"):
        router.route("c", _tokens(90, 5))


def test_a_finished_requests_output_blocks_count_as_cached():
    router = PrefixRouter(2, BS, max_blocks_per_replica=100, max_imbalance=None)
    prompt = _tokens(0, BS + 1)
    assert router.route("turn1", prompt) == 0
    router.route("other", _tokens(500, 2))  # replica 1 busy so both have load 1
    answer = _tokens(40, 2 * BS)
    router.finish("turn1", prompt + answer)
    router.route("x", _tokens(900, 2))  # replica 0 back to load 1
    follow_up = prompt + answer + _tokens(70, 3)
    assert router.matched_blocks(0, follow_up) == 3
    assert router.route("turn2", follow_up) == 0


def test_memory_per_replica_is_bounded_and_least_recently_used_goes_first():
    router = PrefixRouter(1, BS, max_blocks_per_replica=4)
    old = _tokens(0, 3 * BS + 1)
    router.route("old", old)
    for i in range(20):
        router.route(f"r{i}", _tokens(1000 * (i + 1), 2 * BS + 1))
        assert len(router.cached[0]) <= 4
    assert router.matched_blocks(0, old) == 0  # evicted
    assert router.matched_blocks(0, _tokens(20000, 2 * BS + 1)) == 2  # the newest stays


def test_without_prefix_caching_only_load_counts():
    router = PrefixRouter(2, BS, max_blocks_per_replica=100, enable_prefix_caching=False)
    prompt = _tokens(0, 3 * BS)
    assert [router.route(str(i), prompt) for i in range(4)] == [0, 1, 0, 1]
    assert router.cached == [{}, {}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_replicas": 0}, "num_replicas must be >= 1, got 0"),
        ({"max_blocks_per_replica": -1}, "max_blocks_per_replica must be >= 0, got -1"),
        ({"max_imbalance": -1}, "max_imbalance must be >= 0 or None, got -1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    args = {"num_replicas": 2, "block_size": BS, "max_blocks_per_replica": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        PrefixRouter(**args)
