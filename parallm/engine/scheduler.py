"""Iteration-level continuous batching with chunked prefill and recompute preemption.

Each step the scheduler picks, under a token budget, how many new tokens every sequence
computes. Running sequences come first, oldest first, with one token reserved for every
decode so that a long prompt arriving never stalls them (Dynamic SplitFuse); the rest of the
budget goes to prompt chunks, then to waiting requests. When blocks run out, the newest
running sequence gives its blocks back and is recomputed later. The scheduler decides; it
never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from parallm.config import SchedulerConfig
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence, SequenceStatus


class ScheduledSeq:
    """One sequence's share of a step: tokens ``start .. start+num_new_tokens``."""

    __slots__ = ("seq", "start", "num_new_tokens", "samples")

    def __init__(
        self, seq: Sequence, start: int, num_new_tokens: int, samples: bool | None = None
    ) -> None:
        self.seq = seq
        self.start = start
        self.num_new_tokens = num_new_tokens
        # True when this step computes the sequence's last known token, so it samples.
        self.samples = start + num_new_tokens == seq.num_tokens if samples is None else samples


@dataclass
class ScheduledBatch:
    """Plain data handed to the runner: which sequences, which tokens."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prefill_tokens_computed: int = 0
    num_decode_tokens_computed: int = 0
    num_prefix_cache_queried_tokens: int = 0
    num_prefix_cache_hit_tokens: int = 0


class Scheduler:
    """Owns the waiting queue and the running set; asks the KV cache manager for blocks."""

    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager) -> None:
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence that is done (or aborted) and return its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)

    def schedule(self) -> ScheduledBatch:
        """Choose this step's work."""
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.cfg.max_num_batched_tokens)
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        block_size = self.kv.block_size
        for item in batch.seqs:
            end = item.start + item.num_new_tokens
            if end // block_size > item.seq.num_registered_blocks:
                self.kv.commit_full_blocks(item.seq, end)
            item.seq.num_computed_tokens = end
            self._count(item)
        return batch

    def schedule_continuation(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step after ``prev`` while ``prev``'s tokens are still on the device.

        Every running sequence computes the token ``prev`` is sampling; those that ``prev``
        finishes for sure (``max_tokens``, context end) drop out, and one that stops on EOS or
        a stop string wastes one token that the engine discards. ``prev`` may be a prompt's
        last chunk: its first decode step then overlaps the prefill. Returns None, changing
        nothing that matters, when the step must wait for ``prev``: a prompt to admit, a
        sequence that ``prev`` samples nothing for (an earlier prompt chunk), sampling that
        reads past tokens, or no free block.
        """
        if prev.preempted or (self.waiting and len(self.running) < self.cfg.max_num_seqs):
            return None
        live = []
        for item in prev.seqs:  # one pass: this runs every step for every sequence
            seq = item.seq
            if not item.samples:  # a prompt chunk before the last: no token to follow yet
                return None
            if seq.status is SequenceStatus.FINISHED:
                continue
            if not _can_run_ahead(seq):
                return None
            live.append(seq)
        if len(live) != len(self.running):
            return None
        batch = ScheduledBatch()
        block_size = self.kv.block_size
        max_model_len = self.cfg.max_model_len
        for seq in live:
            if _finishes_with_next_token(seq, max_model_len):
                continue
            computed = seq.num_computed_tokens
            if computed + 1 > len(seq.block_table) * block_size and not self.kv.allocate(seq, 1):
                return None  # blocks taken so far are the ones the next step needs anyway
            batch.seqs.append(ScheduledSeq(seq, computed, 1, samples=True))
        for item in batch.seqs:
            item.seq.num_computed_tokens += 1
        self.stats.num_decode_tokens_computed += len(batch.seqs)
        return batch if batch.seqs else None

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        self.running.sort(key=lambda s: (s.arrival_time, s.seq_id))
        reserved = sum(1 for s in self.running if not s.is_prefilling)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining <= 1:
                reserved -= 1
                num_new = 1
            else:
                num_new = min(remaining, budget - reserved)
                if num_new <= 0:
                    i += 1
                    continue
            if not self._allocate_or_preempt(seq, num_new, batch):
                break
            batch.seqs.append(ScheduledSeq(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        if seq.num_computed_tokens + num_new <= len(seq.block_table) * self.kv.block_size:
            return True  # fits in the blocks it holds: the common decode case
        while not self.kv.allocate(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.stats.num_preemptions += 1

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            parent = seq.wait_for
            if parent is not None and not parent.is_finished and parent.is_prefilling:
                break  # keep FCFS: a sibling waits for the first sample's prompt blocks
            hits = self.kv.lookup_prefix(seq)
            hit_tokens = len(hits) * self.kv.block_size
            remaining = seq.num_tokens - hit_tokens
            if remaining > budget and not self.cfg.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            if not self.kv.allocate(seq, num_new, hits):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.stats.num_prefix_cache_queried_tokens += seq.num_tokens
            self.stats.num_prefix_cache_hit_tokens += hit_tokens
            batch.seqs.append(ScheduledSeq(seq, seq.num_computed_tokens, num_new))
            budget -= num_new

    def _count(self, item: ScheduledSeq) -> None:
        if item.num_new_tokens == 1 and item.samples and item.seq.num_output_tokens > 0:
            self.stats.num_decode_tokens_computed += 1
        else:
            self.stats.num_prefill_tokens_computed += item.num_new_tokens


def _can_run_ahead(seq: Sequence) -> bool:
    """Whether the sequence's next token can be sampled before its last one is on the host."""
    p = seq.params
    # Counted without the pending token, as the runner counts when it bans stop ids.
    return p.history_free and not seq.bans_stop_tokens


def _finishes_with_next_token(seq: Sequence, max_model_len: int) -> bool:
    """True when the token being sampled ends the sequence whatever it is."""
    p = seq.params
    if p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens:
        return True
    return seq.num_tokens + 1 >= max_model_len
