"""Continuous batching decisions: token budget, decodes first, chunking, preemption order."""

from __future__ import annotations

from parallm.config import SchedulerConfig
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence
from parallm.engine.scheduler import Scheduler
from parallm.sampling_params import SamplingParams


def _scheduler(budget: int, num_blocks: int = 64, max_seqs: int = 8) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=512)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size=4, enable_prefix_caching=True))


def _seq(n: int, t: float, first: int = 0) -> Sequence:
    return Sequence(f"r{t}", 0, list(range(first, first + n)), SamplingParams(), arrival_time=t)


def _step(s: Scheduler) -> dict[str, int]:
    """Schedule one step and pretend the model sampled token 7 for every sampling sequence."""
    batch = s.schedule()
    for item in batch.seqs:
        if item.samples:
            item.seq.append_token(7)
    return {item.seq.request_id: item.num_new_tokens for item in batch.seqs}


def test_long_prompt_is_chunked_and_never_stalls_a_decode():
    s = _scheduler(budget=16)
    short = _seq(3, 0.0)
    s.add(short)
    assert _step(s) == {"r0.0": 3}
    s.add(_seq(60, 1.0, first=100))
    chunks = []
    for _ in range(6):
        step = _step(s)
        assert step["r0.0"] == 1  # the decode runs every step
        chunks.append(step.get("r1.0", 0))
    assert chunks[:4] == [15, 15, 15, 15] and chunks[4] == 1  # then r1 decodes too
    assert sum(chunks[:4]) == 60


def test_chunked_prefill_off_waits_for_room_for_the_whole_prompt():
    s = _scheduler(budget=16)
    s.cfg.enable_chunked_prefill = False
    s.add(_seq(10, 0.0))
    s.add(_seq(10, 1.0, first=50))
    assert _step(s) == {"r0.0": 10}  # the second prompt does not fit the 6 tokens left
    assert _step(s) == {"r0.0": 1, "r1.0": 10}


def test_max_num_seqs_caps_the_running_set():
    s = _scheduler(budget=100, max_seqs=2)
    for i in range(4):
        s.add(_seq(3, float(i), first=10 * i))
    assert set(_step(s)) == {"r0.0", "r1.0"}
    assert len(s.waiting) == 2


def test_preemption_takes_the_newest_and_requeues_it_first():
    s = _scheduler(budget=100, num_blocks=6)
    old, new = _seq(8, 0.0), _seq(8, 1.0, first=50)
    s.add(old)
    s.add(new)
    _step(s)  # 2 + 2 blocks used (8 tokens each), both sampled a 9th token
    s.add(_seq(4, 2.0, first=90))
    for _ in range(8):
        _step(s)
        if s.stats.num_preemptions:
            break
    assert s.stats.num_preemptions >= 1
    assert s.waiting[0] is new or s.waiting[0].arrival_time >= 1.0
    assert old in s.running
