"""Drafts from earlier requests (``prompt_lookup_history_tokens``, spec/history.py): the ring's
invariants (whole sequences, newest last, wraps and too-long sequences), its lookup against a
brute-force search over the sequences it holds, the config's checks, and in the engine: greedy
tokens equal plain decoding's while the ring's drafts are accepted, and the device drafter's
staged steps draft from the ring as the host drafter does."""

from __future__ import annotations

import random

import pytest
import torch
from test_device_drafts import _device_llm
from test_speculative import ENGINE, _tokens

from parallm import LLM, SamplingParams
from parallm.engine.request import Sequence
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.drafting import Drafter
from parallm.engine.spec.history import SEPARATOR, TokenHistory, history_ngram_range
from parallm.engine.spec.ngram import rfind_tokens

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def held(history: TokenHistory) -> list[list[int]]:
    """The sequences the ring holds, oldest first (empty runs of separators dropped)."""
    ring, start = history.ring.tolist(), history.start
    laid = ring[:start] + ring[history.fill : history.used] + ring[start : history.fill]
    seqs, current = [], []
    for token in laid:
        if token == SEPARATOR:
            if current:
                seqs.append(current)
            current = []
        else:
            current.append(token)
    assert not current, "the ring's last sequence lacks its separator"
    return seqs


def brute_lookup(seqs: list[list[int]], context: list[int], k: int, lo: int, hi: int) -> list:
    """The definition: longest n first, then the newest sequence and the latest position in
    it whose n tokens equal the context's last n and are followed by a token."""
    for n in range(min(hi, len(context)), lo - 1, -1):
        suffix = context[len(context) - n :]
        for seq in reversed(seqs):
            for end in range(len(seq) - 2, n - 2, -1):
                if seq[end - n + 1 : end + 1] == suffix:
                    return seq[end + 1 : end + 1 + k]
    return []


def test_lookup_takes_the_longest_n_then_the_newest_occurrence():
    h = TokenHistory(64)
    h.add([1, 2, 3, 10, 11])
    h.add([9, 2, 3, 20, 21, 22])
    h.add([5, 6])
    # n = 2 ("2 3") occurs in both: the newer one's continuation.
    assert h.lookup([7, 2, 3], 8, 2, 8) == [20, 21, 22]  # stops before the separator
    # n = 3 ("1 2 3") only in the older one: the longer n wins over the newer occurrence.
    assert h.lookup([1, 2, 3], 2, 2, 8) == [10, 11]
    assert h.lookup([1, 2, 3], 2, 2, 2) == [20, 21]  # n capped at 2
    assert h.lookup([3], 4, 2, 8) == []  # shorter than min_n
    assert h.lookup([5, 6], 4, 2, 8) == []  # occurs, but its sequence ends there
    assert h.lookup([2, 3], 0, 2, 8) == []


def test_an_occurrence_at_its_sequences_end_yields_to_an_older_one():
    h = TokenHistory(64)
    h.add([4, 5, 6, 7])
    h.add([0, 4, 5])  # newer, but nothing follows "4 5" in its sequence
    assert h.lookup([4, 5], 3, 2, 8) == [6, 7]


def test_a_sequence_longer_than_the_ring_keeps_its_last_tokens():
    h = TokenHistory(8)
    h.add(list(range(100, 120)))
    assert held(h) == [list(range(113, 120))]
    assert h.ring.tolist() == [*range(113, 120), SEPARATOR]
    assert (h.fill, h.used) == (8, 8)
    h.add([1, 2, 3])  # no room left: starts over, cutting the long one
    assert (h.fill, h.used, h.wrapped) == (4, 8, True)
    assert held(h) == [[1, 2, 3]]  # the cut one's tail is gone, not half a sequence
    assert h.ring.tolist()[4:] == [SEPARATOR] * 4


def test_a_wrap_keeps_the_older_lap_behind_the_newer_one():
    h = TokenHistory(16)
    h.add([1, 2, 3, 4])  # 0..4
    h.add([5, 6, 7, 8])  # 5..9
    h.add([1, 2, 9, 9])  # 10..14
    assert (h.fill, h.used, h.wrapped) == (15, 15, False)
    h.add([7, 1, 2])  # does not fit 15..: starts over at 0, cutting [1, 2, 3, 4] only
    assert (h.fill, h.used, h.wrapped) == (4, 15, True)
    assert held(h) == [[5, 6, 7, 8], [1, 2, 9, 9], [7, 1, 2]]
    # "1 2" lies at a lower position in the newer lap: still the newest occurrence, but its
    # sequence ends there; the older lap's is followed by 9 9 (the cut "1 2 3 4" is gone).
    assert h.lookup([0, 1, 2], 4, 2, 8) == [9, 9]
    assert h.lookup([7, 1], 4, 2, 8) == [2]
    h.add([6, 7, 1, 2, 5, 5])  # 4..10: over [5, 6, 7, 8], and cutting into [1, 2, 9, 9]
    assert (h.fill, h.used) == (11, 15)
    assert held(h) == [[7, 1, 2], [6, 7, 1, 2, 5, 5]]
    assert h.lookup([1, 2], 4, 2, 8) == [5, 5]
    assert h.lookup([2, 9], 4, 2, 8) == []  # what was left of the cut one: separators


def test_a_wrap_drops_what_lies_past_the_lap_it_ends():
    h = TokenHistory(20)
    h.add([1] * 15)  # 0..15
    h.add([6, 6, 8])  # 16..19: full
    h.add([2] * 5)  # starts over: 0..5, cutting [1] * 15
    h.add([3] * 5)  # 6..11
    h.add([4, 4, 4])  # 12..15
    assert (h.fill, h.used) == (16, 20)
    assert held(h) == [[6, 6, 8], [2] * 5, [3] * 5, [4, 4, 4]]
    assert h.lookup([6, 6], 4, 2, 8) == [8]
    h.add([7] * 5)  # 16..21 does not fit: starts over, exactly over [2] * 5
    assert (h.fill, h.used) == (6, 16)
    # [6, 6, 8] still lies at 16..19, but two laps back: at a higher position than the lap
    # before this one it would rank newer than [3] * 5 and [4, 4, 4], so it is dropped.
    assert held(h) == [[3] * 5, [4, 4, 4], [7] * 5]
    assert h.lookup([6, 6], 4, 2, 8) == []


BASE = [1, 2, 3, 4, SEPARATOR, 5, 6, 1, 2, 7]  # two documents of a datastore


def test_a_base_is_searched_last_and_never_overwritten():
    h = TokenHistory(12, base=BASE)
    assert (h.start, h.fill, h.used) == (11, 11, 11) and len(h.ring) == 23
    assert held(h) == [[1, 2, 3, 4], [5, 6, 1, 2, 7]]
    assert h.lookup([9, 1, 2], 4, 2, 8) == [7]  # the newest document's occurrence
    assert h.lookup([0, 5, 6], 4, 2, 8) == [1, 2, 7]
    h.add([8, 1, 2, 9])  # 11..15: newer than the base
    assert h.lookup([9, 1, 2], 4, 2, 8) == [9]
    assert h.lookup([1, 2, 3], 4, 2, 8) == [4]  # the longer n, in the base
    h.add([6, 6, 6, 6, 6])  # 16..21
    h.add([2, 7, 5])  # does not fit 22..: starts over at the ring's start, not at 0
    assert (h.fill, h.used, h.wrapped) == (15, 22, True)
    assert h.ring.tolist()[:11] == [*BASE, SEPARATOR]
    assert held(h) == [[1, 2, 3, 4], [5, 6, 1, 2, 7], [6, 6, 6, 6, 6], [2, 7, 5]]
    assert h.lookup([2, 7], 4, 2, 8) == [5]  # this lap's, over the base's
    h.to_device("cpu")
    assert h.device_state.tolist() == [15, 22, 11]
    h.clear()  # forgets the requests, keeps the base
    assert held(h) == [[1, 2, 3, 4], [5, 6, 1, 2, 7]] and (h.fill, h.used) == (11, 11)
    assert torch.equal(h.device_ring, h.ring) and h.device_state.tolist() == [11, 11, 11]


def test_a_base_alone_drafts_and_adds_nothing():
    h = TokenHistory(0, base=BASE)
    h.add([1, 2, 9, 9])
    assert held(h) == [[1, 2, 3, 4], [5, 6, 1, 2, 7]] and len(h.ring) == 11
    assert h.lookup([0, 1, 2], 3, 2, 8) == [7]
    with pytest.raises(ValueError, match="capacity must be at least 2 tokens"):
        TokenHistory(0)


def _split(tokens: list[int]) -> list[list[int]]:
    """A base's documents (runs between separators), as ``held`` lists them."""
    docs, current = [], []
    for token in [*tokens, SEPARATOR]:
        if token == SEPARATOR:
            docs += [current] if current else []
            current = []
        else:
            current.append(token)
    return docs


@pytest.mark.parametrize("seed", range(6))
def test_random_adds_keep_whole_sequences_newest_last(seed):
    """Odd seeds lay a random base (a datastore) before the ring: it stays whole, first
    (oldest), whatever the ring's laps."""
    rng = random.Random(seed)
    capacity = rng.choice([7, 30, 100])
    base = [rng.choice([0, 1, 2, 3, SEPARATOR]) for _ in range(rng.choice([9, 40]))]
    h = TokenHistory(capacity, base if seed % 2 else None)
    documents, added = _split(base) if seed % 2 else [], []
    for _ in range(60):
        seq = [rng.randrange(4) for _ in range(rng.choice([0, 2, 5, 12, 40]))]
        h.add(seq)
        added.append(seq[-(capacity - 1) :])
        seqs = held(h)
        assert seqs[: len(documents)] == documents
        ring = seqs[len(documents) :]
        if seq:
            assert ring[-1] == added[-1]  # the newest is whole
        tail = [s for s in added if s][-len(ring) :] if ring else []
        assert ring == tail  # whole sequences, in the order they were added
        for _ in range(4):
            context = [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
            k, (lo, hi) = rng.choice([1, 3, 8]), rng.choice([(2, 8), (1, 3), (3, 5)])
            assert h.lookup(context, k, lo, hi) == brute_lookup(seqs, context, k, lo, hi)


def test_clear_forgets_everything():
    h = TokenHistory(16)
    h.add([1, 2, 3])
    h.to_device("cpu")
    h.clear()
    assert (h.fill, h.used) == (0, 0) and h.lookup([1, 2], 4, 2, 8) == []
    assert h.ring.eq(SEPARATOR).all() and h.device_ring.eq(SEPARATOR).all()
    assert h.device_state.tolist() == [0, 0, 0]
    h.add([1, 2, 3])
    assert h.lookup([1, 2], 4, 2, 8) == [3]


def test_the_device_copy_follows_every_add():
    rng = random.Random(3)
    h = TokenHistory(40)
    h.add([1, 2, 3])
    h.to_device("cpu")
    ring, state = h.device_ring, h.device_state
    assert ring.data_ptr() != h.ring.data_ptr()  # a copy, as on a GPU
    for _ in range(30):
        h.add([rng.randrange(5) for _ in range(rng.randrange(0, 15))])
        assert torch.equal(ring, h.ring) and state.tolist() == [h.fill, h.used, h.start]
    h.to_device("cpu")  # again: the same tensors (a captured graph holds them)
    assert h.device_ring is ring and h.device_state is state


def test_rfind_tokens_skips_matches_across_token_boundaries():
    words = torch.tensor([0x0100, 0x0001, 7, 0x0100], dtype=torch.int32).numpy().tobytes()
    pattern = torch.tensor([0x0100], dtype=torch.int32).numpy().tobytes()
    assert rfind_tokens(words, pattern, 0, len(words)) == 12
    assert rfind_tokens(words, pattern, 0, 12) == 0  # not the byte match straddling 0 and 1
    assert rfind_tokens(words, pattern, 4, 12) == -1


def test_history_ngram_range_starts_at_two_and_reaches_eight():
    assert history_ngram_range(1, 3) == (2, 8)
    assert history_ngram_range(3, 5) == (3, 8)
    assert history_ngram_range(2, 12) == (2, 12)


def test_the_config_key_defaults_to_a_ring_for_ngram_only_and_is_checked():
    assert SpeculativeConfig.from_value(NGRAM).prompt_lookup_history_tokens == 1 << 16
    off = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_history_tokens": 0})
    assert off.prompt_lookup_history_tokens == 0
    on = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_history_tokens": 4096})
    assert on.prompt_lookup_history_tokens == 4096
    # Unset, or left at 0, by another method: not "given", and no ring.
    medusa = {"method": "medusa", "num_speculative_tokens": 2, "model": "heads"}
    assert SpeculativeConfig.from_value(medusa).prompt_lookup_history_tokens == 0
    assert SpeculativeConfig.from_value({**medusa, "prompt_lookup_history_tokens": 0})


# Own lookups of 3-4 tokens: a fresh random prompt rarely drafts from itself, so the ring
# (n from 3 to 8) is what drafts a request that repeats an earlier one.
RING_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 3,
             "prompt_lookup_max": 4, "prompt_lookup_history_tokens": 4096}  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _workload(ordinary_token_ids: list[int]) -> list[list[int]]:
    """Fresh prompts, each asked twice in a row, and one sharing the first one's start."""
    rng = random.Random(11)
    a, b = (rng.choices(ordinary_token_ids, k=24) for _ in range(2))
    return [a, a, b, b, a[:12] + rng.choices(ordinary_token_ids, k=5)]


def _one_at_a_time(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's greedy tokens, one request after the other: each request's steps see the
    ring of every earlier one, on the host and on the device alike."""
    return [_tokens(llm, [p], GREEDY)[0][0] for p in prompts]


def test_the_drafter_remembers_finished_sequences_and_falls_back_to_them():
    config = SpeculativeConfig.from_value(RING_SPEC)
    drafter = Drafter(config)
    off = {**NGRAM, "prompt_lookup_history_tokens": 0}
    assert Drafter(SpeculativeConfig.from_value(off)).history is None
    assert Drafter(SpeculativeConfig.from_value(NGRAM)).history.capacity == 1 << 16
    finished = Sequence("r0", 0, [5, 6, 7], SamplingParams(), arrival_time=0.0)
    for token in (8, 9, 10):
        finished.append_token(token)
    drafter.remember([finished])
    assert held(drafter.history) == [[5, 6, 7, 8, 9, 10]]
    assert drafter._lookup([1, 2, 3, 6, 7, 8], 4) == [9, 10]  # own lookup: nothing
    assert drafter._lookup([6, 7, 8, 1, 6, 7, 8], 4) == [1, 6, 7, 8]  # own lookup first
    assert drafter._lookup([1, 2, 7, 8], 4) == []  # 2 tokens: below prompt_lookup_min


def test_greedy_tokens_are_plain_decodings_and_the_rings_drafts_are_accepted(
    tiny_model_dir, ordinary_token_ids
):
    path = str(tiny_model_dir("llama3"))
    prompts = _workload(ordinary_token_ids)
    plain = _one_at_a_time(LLM(path, **ENGINE), prompts)
    without = LLM(path, speculative_config={**RING_SPEC, "prompt_lookup_history_tokens": 0},
                  **ENGINE)  # fmt: skip
    llm = LLM(path, speculative_config=RING_SPEC, **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _one_at_a_time(without, prompts) == plain
    assert _one_at_a_time(llm, prompts) == plain
    assert llm.engine.kv.num_free_blocks == free
    ring, own = llm.engine.spec_stats, without.engine.spec_stats
    # A repeated request drafts its whole output from the earlier one, all of it accepted.
    assert ring.accepted_tokens - own.accepted_tokens >= len(plain[0]) // 2
    assert ring.num_proposals > own.num_proposals
    assert held(llm.engine.drafter.history)[:2] == [prompts[0] + plain[0]] * 2


def test_device_staged_steps_draft_from_the_ring_as_the_host_drafter_does(
    tiny_model_dir, ordinary_token_ids
):
    """The device drafter's tail (the kernels' twins on CPU) over the ring's device copy: the
    same proposals, accepted alike, as the host drafter's with the same ring; a tail that
    skipped the ring would propose less than the host."""
    path = str(tiny_model_dir("llama3"))
    prompts = _workload(ordinary_token_ids)
    host = LLM(path, speculative_config=RING_SPEC, async_scheduling=True, **ENGINE)
    want = _one_at_a_time(host, prompts)
    llm = _device_llm(path, RING_SPEC)
    engine = llm.engine
    assert engine.runner.device_drafts.history is engine.drafter.history
    free = engine.kv.num_free_blocks
    assert _one_at_a_time(llm, prompts) == want
    assert engine.stats["num_overlapped_steps"] > 10 and engine.stats["num_discarded_steps"] == 0
    got, expected = engine.spec_stats, host.engine.spec_stats
    assert expected.accepted_tokens >= len(want[0]) // 2  # the ring drafted (own lookups: none)
    assert got == expected
    assert engine._inflight is None and engine.kv.num_free_blocks == free


@pytest.mark.gpu
def test_device_staged_steps_draft_from_the_ring_on_cuda(tiny_model_dir, ordinary_token_ids):
    """On CUDA (async scheduling, captured verify and tail graphs, the Triton kernels): the
    synchronous steps' tokens and proposals over the same full chains, and in float32 plain
    decoding's tokens, with the tail graphs reading the ring's device copy as it grows."""
    path = str(tiny_model_dir("llama3"))
    prompts = _workload(ordinary_token_ids)
    engine_args = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20,
                       enable_prefix_caching=False)  # fmt: skip
    spec_args = dict(engine_args, cuda_graph_sizes=(1, 2, 4), speculative_config=RING_SPEC)
    sync = LLM(path, async_scheduling=False, **spec_args)
    # The same full chains, staged from the host.
    sync.engine.use_full_chains(True)
    want = _one_at_a_time(sync, prompts)
    llm = LLM(path, **spec_args)
    engine, drafts = llm.engine, llm.engine.runner.device_drafts
    assert drafts is not None and drafts.history is engine.drafter.history
    assert drafts.history.device_ring.is_cuda and drafts.graphs is not None
    assert _one_at_a_time(llm, prompts) == want
    assert engine.num_overlapped_steps > 10 and drafts.graphs.num_replays > 10
    assert sync.engine.spec_stats.accepted_tokens >= len(want[0]) // 2  # the ring drafted
    assert engine.spec_stats == sync.engine.spec_stats
    assert _one_at_a_time(LLM(path, **engine_args), prompts) == want


def test_a_base_without_an_index_is_scanned_alike():
    rng = random.Random(7)
    base = [rng.choice([0, 1, 2, SEPARATOR]) for _ in range(300)]
    indexed, scanned = TokenHistory(64, base), TokenHistory(64, base, index_depth=0)
    assert indexed._index is not None and scanned._index is None
    for _ in range(100):
        context = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
        assert indexed.lookup(context, 4, 2, 8) == scanned.lookup(context, 4, 2, 8)
