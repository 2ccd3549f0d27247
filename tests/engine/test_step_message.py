"""The scheduler's message to the runner: scheduled tokens, draft tokens, KV connector data."""

from __future__ import annotations

import dataclasses

import pytest

from parallm.config import SchedulerConfig
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence
from parallm.engine.scheduler import (
    KVConnectorMetadata,
    ScheduledBatch,
    ScheduledSeq,
    Scheduler,
)
from parallm.sampling_params import SamplingParams

BLOCK = 4


def _scheduler(budget: int = 64, num_blocks: int = 64, max_model_len: int = 512) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_model_len
    )
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size=BLOCK, enable_prefix_caching=True))


def _running(s: Scheduler, *prompt_lens: int, **params: object) -> list[Sequence]:
    """Sequences past their prompts (one step for all): one token sampled, next step pending."""
    seqs = [
        Sequence(f"r{i}", 0, list(range(100 * i, 100 * i + n)), SamplingParams(**params),
                 arrival_time=float(i))
        for i, n in enumerate(prompt_lens)
    ]  # fmt: skip
    for seq in seqs:
        s.add(seq)
    batch = s.schedule()
    assert [item.seq for item in batch.seqs if item.samples] == seqs
    for seq in seqs:
        seq.append_token(7)
    return seqs


def _item(batch: ScheduledBatch, seq: Sequence) -> ScheduledSeq:
    (item,) = [item for item in batch.seqs if item.seq is seq]
    return item


def test_drafts_follow_the_last_known_token_and_count_everywhere():
    s = _scheduler()
    (seq,) = _running(s, 6)  # 7 known tokens, 6 computed, 2 blocks
    free_before = s.kv.num_free_blocks
    seq.draft_token_ids = [11, 12, 13]
    batch = s.schedule()
    item = _item(batch, seq)
    assert (item.start, item.num_new_tokens, item.samples) == (6, 1, True)
    assert item.draft_token_ids == [11, 12, 13] and item.num_scheduled_tokens == 4
    assert batch.num_tokens == 4
    assert batch.scheduled_spec_decode_tokens == {seq.seq_id: [11, 12, 13]}
    assert not batch.is_pure_decode
    # Positions 6..9 need slots: a third block; the drafts count as computed until rolled back.
    assert len(seq.block_table) == 3 and s.kv.num_free_blocks == free_before - 1
    assert seq.num_computed_tokens == 10
    assert seq.draft_token_ids == []  # consumed: never scheduled twice
    assert s.stats.num_decode_tokens_computed == 4


def test_drafts_leave_every_other_decode_its_token():
    s = _scheduler(budget=16)
    a, *others = _running(s, 3, 3, 3, 3)
    s.cfg.max_num_batched_tokens = 8
    a.draft_token_ids = list(range(20, 30))
    batch = s.schedule()
    # 8 tokens: one for each of the four decodes, the four left over for a's drafts.
    assert _item(batch, a).draft_token_ids == [20, 21, 22, 23]
    assert all(_item(batch, o).num_scheduled_tokens == 1 for o in others)
    assert batch.num_tokens == 8


def test_drafts_come_after_prompt_chunks_and_before_waiting_prompts():
    s = _scheduler(budget=10)
    (a,) = _running(s, 3)
    a.draft_token_ids = [1, 2, 3]
    s.add(Sequence("late", 0, list(range(50, 70)), SamplingParams(), arrival_time=5.0))
    batch = s.schedule()
    assert _item(batch, a).num_scheduled_tokens == 4
    assert {item.seq.request_id: item.num_new_tokens for item in batch.seqs} == {
        a.request_id: 1,
        "late": 6,
    }
    # A running sequence's prompt chunk is known work: it comes before anyone's drafts.
    s.cfg.max_num_batched_tokens = 6
    (late,) = [item.seq for item in batch.seqs if item.seq.request_id == "late"]
    a.append_token(7)
    a.draft_token_ids = [1, 2, 3]
    s.kv.rollback(a, 3)
    batch = s.schedule()
    assert _item(batch, late).num_new_tokens == 5 and _item(batch, a).draft_token_ids == []


@pytest.mark.parametrize(
    ("max_tokens", "max_model_len", "expected"),
    [(None, 512, 5), (3, 512, 1), (2, 512, 0), (None, 10, 1)],
)
def test_drafts_stop_where_the_sequence_must(max_tokens, max_model_len, expected):
    s = _scheduler(max_model_len=max_model_len)
    (seq,) = _running(s, 7, max_tokens=max_tokens)  # 8 tokens, 1 of them an output
    seq.draft_token_ids = [1, 2, 3, 4, 5]
    item = _item(s.schedule(), seq)
    # Accepting every draft plus the sampled token must stay within max_tokens/max_model_len.
    assert len(item.draft_token_ids) == expected
    assert seq.num_computed_tokens == 8 + expected


def test_drafts_never_preempt_nor_take_a_block_a_known_token_needs():
    s = _scheduler(num_blocks=5)
    a, b = _running(s, 8, 4)  # blocks: a 2, b 1; 2 free
    a.draft_token_ids = list(range(10))
    b.draft_token_ids = list(range(10))
    batch = s.schedule()
    # a's token 8 and b's token 4 each take one of the free blocks; a's drafts may then fill
    # only the rest of its third block (positions 9..11), b's the rest of its second.
    assert not batch.preempted and s.stats.num_preemptions == 0
    assert _item(batch, a).draft_token_ids == [0, 1, 2]
    assert _item(batch, b).draft_token_ids == [0, 1, 2]
    assert s.kv.num_free_blocks == 0 and len(a.block_table) == 3 and len(b.block_table) == 2


def test_a_drafted_step_does_not_run_ahead():
    s = _scheduler()
    (seq,) = _running(s, 6)
    seq.draft_token_ids = [1, 2]
    assert s.schedule_continuation(s.schedule()) is None
    plain = _scheduler()
    (other,) = _running(plain, 6)
    prev = plain.schedule()
    other.draft_token_ids = [1, 2]  # proposed meanwhile: they need a step of their own
    assert plain.schedule_continuation(prev) is None
    other.draft_token_ids = []
    assert plain.schedule_continuation(prev) is not None


def test_only_a_sampling_sequence_carries_drafts():
    seq = Sequence("r", 0, list(range(10)), SamplingParams(), arrival_time=0.0)
    with pytest.raises(ValueError, match="draft_token_ids"):
        ScheduledSeq(seq, 0, 4, draft_token_ids=[1])
    chunked = _scheduler(budget=4)
    chunked.add(seq)
    seq.draft_token_ids = [1, 2]
    assert _item(chunked.schedule(), seq).draft_token_ids == []  # a prompt chunk
    assert _item(chunked.schedule(), seq).draft_token_ids == []  # running, still a chunk
    assert seq.draft_token_ids == [1, 2]  # kept for when the prompt is done


def test_the_message_is_plain_data_with_no_connector_by_default():
    s = _scheduler()
    _running(s, 3)
    batch = s.schedule()
    assert batch.kv_connector_metadata is None and batch.is_pure_decode
    meta = KVConnectorMetadata(blocks_to_import={3: [0, 1]}, blocks_to_export={4: [2]})
    assert dataclasses.replace(batch, kv_connector_metadata=meta).kv_connector_metadata is meta
    assert KVConnectorMetadata() == KVConnectorMetadata(blocks_to_import={}, blocks_to_export={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.payload = object()
