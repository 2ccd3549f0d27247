"""Rolling a sequence back by n tokens: rejected drafts give their slots and blocks back and
never reach the prefix cache."""

from __future__ import annotations

import random

import pytest
from test_kv_cache import _admit  # a sequence admitted with its prefix hits, all computed

from parallm.config import SchedulerConfig
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence
from parallm.engine.scheduler import ScheduledBatch, Scheduler
from parallm.sampling_params import SamplingParams

BLOCK = 4


def _seq(tokens: list[int], name: str = "r") -> Sequence:
    return Sequence(name, 0, tokens, SamplingParams(), arrival_time=0.0)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
@pytest.mark.parametrize("rejected", [0, 1, "all"])
def test_rollback_returns_the_slots_and_blocks_of_rejected_drafts(k, rejected):
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    seq = _seq(list(range(6)))
    _admit(kv, seq)
    seq.num_computed_tokens = 5  # the last prompt token is computed with the drafts
    assert kv.allocate(seq, 1 + k)
    seq.num_computed_tokens = 6 + k
    assert len(seq.block_table) == -(-(6 + k) // BLOCK)
    r = k if rejected == "all" else rejected
    kv.rollback(seq, r)
    kept = 6 + k - r
    assert seq.num_computed_tokens == kept
    assert len(seq.block_table) == -(-kept // BLOCK)
    assert kv.num_free_blocks == 16 - len(seq.block_table)
    kv.free(seq)
    assert kv.num_free_blocks == 16 and all(b.ref_count == 0 for b in kv.blocks)


def test_rollback_into_a_registered_block_takes_it_out_of_the_prefix_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    seq = _seq(list(range(10)))
    _admit(kv, seq)  # blocks 0 and 1 full and registered
    assert seq.num_registered_blocks == 2
    kv.rollback(seq, 5)  # back to 5 tokens: block 1 keeps token 4 and will be rewritten
    assert seq.num_registered_blocks == 1 and len(seq.block_table) == 2
    probe = _seq(list(range(10)) + [1])
    assert kv.lookup_prefix(probe) == seq.block_table[:1]
    kv.rollback(seq, 1)  # exactly on a block boundary: block 1 is no longer held
    assert seq.block_table == seq.block_table[:1] and seq.num_computed_tokens == 4
    assert kv.num_free_blocks == 7


def test_rollback_never_rewrites_a_shared_block():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    first = _seq(list(range(8)))
    _admit(kv, first)
    second = _seq(list(range(8)) + [50, 51], name="s")
    assert _admit(kv, second) == first.block_table
    table, free = list(second.block_table), kv.num_free_blocks
    with pytest.raises(ValueError, match="shared"):
        kv.rollback(second, 7)  # token 3 is inside block 0, which first holds too
    assert second.block_table == table and kv.num_free_blocks == free
    assert second.num_computed_tokens == 10
    kv.rollback(second, 6)  # back to a block boundary: nothing shared gets rewritten
    assert second.block_table == table[:1] and kv.blocks[table[1]].ref_count == 1


@pytest.mark.parametrize("num_tokens", [-1, 11])
def test_rollback_checks_its_count(num_tokens):
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=True)
    seq = _seq(list(range(10)))
    _admit(kv, seq)
    with pytest.raises(ValueError, match="num_tokens must be between 0 and the 10 computed"):
        kv.rollback(seq, num_tokens)
    kv.rollback(seq, 0)
    assert seq.num_computed_tokens == 10 and len(seq.block_table) == 3


class FakeCache:
    """What the model would have written into each KV slot, as token ids."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], int] = {}

    def write(self, batch: ScheduledBatch) -> None:
        for item in batch.seqs:
            seq = item.seq
            known = seq.token_ids[item.start : item.start + item.num_new_tokens]
            for j, token in enumerate(known + item.draft_token_ids):
                pos = item.start + j
                self.slots[seq.block_table[pos // BLOCK], pos % BLOCK] = token

    def block(self, block_id: int) -> list[int | None]:
        return [self.slots.get((block_id, i)) for i in range(BLOCK)]

    def check_computed(self, seq: Sequence) -> None:
        """Every computed position's slot holds that position's token."""
        assert len(seq.block_table) == -(-seq.num_computed_tokens // BLOCK)
        for pos in range(seq.num_computed_tokens):
            slot = seq.block_table[pos // BLOCK], pos % BLOCK
            assert self.slots[slot] == seq.token_ids[pos], (seq.request_id, pos)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_draft_rounds_keep_the_cache_true_and_leak_nothing(prefix_caching):
    rng = random.Random(13)
    num_blocks = 30
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24, max_model_len=256)
    kv = KVCacheManager(num_blocks, block_size=BLOCK, enable_prefix_caching=prefix_caching)
    s = Scheduler(cfg, kv)
    cache = FakeCache()
    probes: list[Sequence] = []  # prompts that hold drafts as they were written, rejected ones too
    names = iter(range(10**6))

    def add(tokens: list[int]) -> None:
        s.add(_seq(tokens, name=f"q{next(names)}"))

    def check_hits(probe: Sequence) -> int:
        """A prefix hit hands out a block whose every slot holds the probe's own tokens."""
        hits = kv.lookup_prefix(probe)
        for i, block_id in enumerate(hits):
            assert cache.block(block_id) == probe.token_ids[i * BLOCK : (i + 1) * BLOCK]
        return len(hits)

    for i in range(3):
        add([i] * 3 + list(range(6)))
    num_hits = num_drafted = 0
    for _ in range(150):
        batch = s.schedule()
        cache.write(batch)
        for item in batch.seqs:
            seq = item.seq
            if item.samples:
                drafts = item.draft_token_ids
                num_drafted += bool(drafts)
                probes.append(_seq(seq.token_ids + drafts + [1], name="probe"))
                accepted = rng.randint(0, len(drafts))
                for token in drafts[:accepted]:
                    seq.append_token(token)
                seq.append_token(rng.randrange(50))  # sampled after the accepted drafts
                kv.rollback(seq, len(drafts) - accepted)
            cache.check_computed(seq)
            if not item.samples:
                continue
            if seq.num_output_tokens > 24 + rng.randrange(20):
                s.finish(seq)
                add(seq.token_ids[: rng.randrange(1, seq.num_tokens)] + [rng.randrange(50)])
            else:  # the next step's proposals
                seq.draft_token_ids = [rng.randrange(50) for _ in range(rng.randint(0, 6))]
        # Slots get rewritten step after step: every hit must stay true, not only the new ones.
        num_hits += sum(check_hits(probe) for probe in probes[-40:])
    assert num_drafted > 50 and s.stats.num_preemptions > 0, (num_drafted, s.stats)
    assert (num_hits > 0) == prefix_caching
    for seq in list(s.running) + list(s.waiting):
        s.finish(seq)
    assert kv.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)


def test_rewind_keeps_the_blocks_that_trim_then_returns():
    """A rewind takes the count back as a rollback does, but every block stays held (a step
    in flight may still write into them) until ``trim``; the tail block leaves the prefix cache
    all the same."""
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    seq = _seq(list(range(10)))
    _admit(kv, seq)  # blocks 0 and 1 full and registered, block 2 half full
    assert kv.allocate(seq, 12)  # a reserve: three more blocks, none computed yet
    held = list(seq.block_table)
    seq.num_computed_tokens = 10 + 7
    kv.rewind(seq, 12)  # back to 5 tokens: block 1 keeps token 4 and will be rewritten
    assert seq.num_computed_tokens == 5 and seq.block_table == held
    assert seq.num_registered_blocks == 1
    assert kv.lookup_prefix(_seq(list(range(10)) + [1])) == held[:1]
    assert kv.num_free_blocks == 16 - len(held)
    kv.trim(seq)
    assert seq.block_table == held[:2] and kv.num_free_blocks == 14
    with pytest.raises(ValueError, match="num_tokens must be between 0 and the 5"):
        kv.rewind(seq, 6)
    kv.free(seq)
    assert kv.num_free_blocks == 16 and all(b.ref_count == 0 for b in kv.blocks)


def _drafted_step(s: Scheduler, seq: Sequence, drafts: list[int]) -> ScheduledBatch:
    """``seq`` decoding (its prompt computed, one output token) in a step with ``drafts``."""
    s.add(seq)
    s.schedule()  # the prompt
    seq.append_token(7)
    seq.draft_token_ids = list(drafts)
    batch = s.schedule()
    assert batch.seqs[0].draft_token_ids == drafts
    return batch


def test_a_device_continuation_reserves_two_steps_of_blocks_behind_placeholder_drafts():
    kv = KVCacheManager(num_blocks=40, block_size=BLOCK, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    seq = _seq(list(range(9)))
    prev = _drafted_step(s, seq, [1, 2, 3])
    computed = seq.num_computed_tokens  # 10 known tokens (the last one) and 3 drafts: 13
    assert computed == 13
    batch = s.schedule_device_continuation(prev, 3)
    assert batch.staged_on_device and batch.known_on_device
    (item,) = batch.seqs
    assert item.draft_token_ids == [0, 0, 0] and item.num_scheduled_tokens == 4
    assert seq.num_computed_tokens == computed + 4
    assert len(seq.block_table) == -(-(computed + 8) // BLOCK)  # and the step after it
    # Rewound to the real end once prev's outputs say one draft was accepted.
    kv.rewind(seq, 2)
    assert seq.num_computed_tokens == computed + 2 and len(seq.block_table) == 6


@pytest.mark.parametrize("why", ["short chain", "max_tokens", "waiting prompt"])
def test_the_host_takes_the_step_when_a_device_continuation_cannot(why):
    kv = KVCacheManager(num_blocks=40, block_size=BLOCK, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    max_tokens = 8 if why == "max_tokens" else None  # passed within this step and the next
    seq = Sequence("r", 0, list(range(9)), SamplingParams(max_tokens=max_tokens), arrival_time=0.0)
    prev = _drafted_step(s, seq, [1, 2] if why == "short chain" else [1, 2, 3])
    if why == "waiting prompt":
        s.add(_seq([5] * 6, name="other"))
    before = (seq.num_computed_tokens, list(seq.block_table), kv.num_free_blocks)
    assert s.schedule_device_continuation(prev, 3) is None
    assert (seq.num_computed_tokens, seq.block_table, kv.num_free_blocks) == before
