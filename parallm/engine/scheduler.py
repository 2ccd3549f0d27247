"""Iteration-level continuous batching with chunked prefill and recompute preemption.

Each step the scheduler picks, under a token budget, how many new tokens every sequence
computes. Running sequences come first, oldest first, with one token reserved for every
decode so that a long prompt arriving never stalls them (Dynamic SplitFuse); the rest of the
budget goes to prompt chunks, then to draft tokens (speculative decoding) that sequences
carry, then to waiting requests. When blocks run out, the newest running sequence gives its
blocks back and is recomputed later. The scheduler decides; it never touches tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parallm.config import SchedulerConfig
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.request import Sequence, SequenceStatus

if TYPE_CHECKING:
    import torch

    from parallm.engine.spec.tree import DraftTree


class ScheduledSeq:
    """One sequence's share of a step.

    The step computes the known tokens ``seq.token_ids[start : start + num_new_tokens]`` and,
    at the positions after them, ``draft_token_ids``: proposed tokens (speculative decoding)
    that are not part of the sequence until accepted. Drafts follow the sequence's last known
    token only, so a drafted sequence always samples. ``num_scheduled_tokens`` counts both.
    """

    __slots__ = ("seq", "start", "num_new_tokens", "draft_token_ids", "samples", "draft_tree",
                 "draft_probs", "num_fillers")  # fmt: skip

    def __init__(
        self,
        seq: Sequence,
        start: int,
        num_new_tokens: int,
        samples: bool | None = None,
        draft_token_ids: list[int] | None = None,
        draft_tree: DraftTree | None = None,
    ) -> None:
        self.seq = seq
        self.start = start
        self.num_new_tokens = num_new_tokens
        # True when this step computes the sequence's last known token, so it samples.
        self.samples = start + num_new_tokens == seq.num_tokens if samples is None else samples
        self.draft_token_ids = [] if draft_token_ids is None else draft_token_ids
        if self.draft_token_ids and not self.samples:
            raise ValueError("draft_token_ids must follow the sequence's last known token")
        # The drafts' tree (their tokens are draft_token_ids), or None for a chain.
        self.draft_tree = draft_tree
        # The rows of ``seq.draft_probs`` for these drafts (sampled by a draft model), or None.
        self.draft_probs: torch.Tensor | None = None
        # The last ``num_fillers`` drafts are a full chain's fillers, not proposed (device
        # mode: docs/DEVICE_DRAFTER.md); verified like the rest, counted as no proposal.
        self.num_fillers = 0

    @property
    def num_proposed(self) -> int:
        """Drafts the drafter proposed: ``draft_token_ids`` less the fillers."""
        return len(self.draft_token_ids) - self.num_fillers

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens this step computes for the sequence: known ones and drafts."""
        return self.num_new_tokens + len(self.draft_token_ids)


@dataclass(frozen=True)
class KVConnectorMetadata:
    """What a KV connector moves around one step, as plain block ids (no tensors).

    ``blocks_to_import``: per sequence (``seq_id``), blocks of this engine's cache that the
    connector fills before the step (KV computed elsewhere); ``blocks_to_export``: blocks whose
    KV it sends out once the step has written them. ``payload`` is the connector's own plain
    data, which the runner hands over untouched. The engine has no connector yet, so no step
    carries any.
    """

    blocks_to_import: dict[int, list[int]] = field(default_factory=dict)
    blocks_to_export: dict[int, list[int]] = field(default_factory=dict)
    payload: object = None


@dataclass
class ScheduledBatch:
    """The scheduler's message to the runner, plain data like vLLM v1's ``SchedulerOutput``.

    Per sequence: which known tokens and which drafts this step computes (``seqs``); per step:
    the sequences preempted by it and the KV connector's work, if any.
    """

    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    kv_connector_metadata: KVConnectorMetadata | None = None
    # Each sequence's one known token is still on the device (the last step samples it): the
    # runner gets them as ``device_ids``, the host holds drafts only. Not so for the last
    # ``num_admitted`` sequences: prompts admitted into a step launched ahead, all on the host.
    known_on_device: bool = False
    num_admitted: int = 0
    # Every input of the step is staged on the device by the last step's tail (the device
    # drafter): the host's drafts are placeholders until that step's outputs bring the real
    # ones, and its positions assume the last step accepted every draft.
    staged_on_device: bool = False
    # The step runs the device drafter's tail after its forward (spec/device_drafts.py): it
    # stages the next verify step on the device, so that one can launch before this one ends.
    device_tail: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens computed by the step, drafts included (vLLM's total_num_scheduled_tokens)."""
        return sum(s.num_scheduled_tokens for s in self.seqs)

    @property
    def scheduled_spec_decode_tokens(self) -> dict[int, list[int]]:
        """``seq_id`` -> draft token ids, for the sequences that carry drafts."""
        return {s.seq.seq_id: s.draft_token_ids for s in self.seqs if s.draft_token_ids}

    @property
    def has_prompt_tokens(self) -> bool:
        """Whether some sequence computes known tokens other than its last (a prompt chunk):
        a step with drafts or without, of one known token per sequence, has none."""
        return not all(s.num_new_tokens == 1 and s.samples for s in self.seqs)

    @property
    def is_pure_decode(self) -> bool:
        """One known token per sequence, each sampling, no drafts: the graph-captured step."""
        return all(s.num_new_tokens == 1 and s.samples and not s.draft_token_ids for s in self.seqs)


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
        # The drafter's chains are full (the device drafter's fixed shapes: k rows a sequence,
        # fillers where the lookup found fewer): drafts are then cut by the context alone.
        self.full_chains = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

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
            budget = self._schedule_drafts(batch, budget)
            self._schedule_waiting(batch, budget)
        self._start(batch.seqs)
        return batch

    def _start(self, items: list[ScheduledSeq]) -> None:
        """Count scheduled work as computed: first scheduling times, full blocks into the
        prefix cache, each sequence's computed tokens (drafts included) and the stats."""
        block_size = self.kv.block_size
        now = time.monotonic()
        for item in items:
            seq = item.seq
            if seq.first_scheduled_time is None:  # a preempted sequence keeps its first time
                seq.first_scheduled_time = now
            # Only known tokens are hashed into the prefix cache, never drafts.
            end = item.start + item.num_new_tokens
            if end // block_size > seq.num_registered_blocks:
                self.kv.commit_full_blocks(seq, end)
            # Drafts count as computed until the rejected ones are rolled back
            # (KVCacheManager.rollback). Proposals not taken go stale with this sample.
            seq.num_computed_tokens = end + len(item.draft_token_ids)
            if item.samples and seq.draft_token_ids:
                seq.draft_token_ids = []
                seq.num_draft_fillers = 0
                seq.draft_tree = None
                seq.draft_probs = None
            self._count(item)

    def schedule_continuation(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step after ``prev`` while ``prev``'s tokens are still on the device.

        Every running sequence computes the token ``prev`` is sampling; those that ``prev``
        finishes for sure (``max_tokens``, context end) drop out, and one that stops on EOS or
        a stop string wastes one token that the engine discards. ``prev`` may be a prompt's
        last chunk: its first decode step then overlaps the prefill. Waiting prompts that a
        free sequence slot, the budget and the free blocks admit join the step after the decode
        rows (``num_admitted``), as ``schedule`` would admit them: their tokens are on the
        host, and a step carrying a new prompt need not wait for the last one (vLLM's async
        scheduling admits the same way). Returns None, changing nothing that matters, when the
        step must wait for ``prev``: a sequence that ``prev`` samples nothing for (an earlier
        prompt chunk), sampling that reads past tokens, or no free block.
        """
        if prev.preempted:
            return None
        live = []
        for item in prev.seqs:  # one pass: this runs every step for every sequence
            seq = item.seq
            if not item.samples:  # a prompt chunk before the last: no token to follow yet
                return None
            if item.draft_token_ids:  # how many tokens it yields is known only after it
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
        if self._admission_pending():
            self._admit_ahead(batch)
        return batch if batch.seqs else None

    def _admit_ahead(self, batch: ScheduledBatch) -> None:
        """Waiting prompts into the continuation ``batch`` of decode rows, in the budget left."""
        decoding = len(batch.seqs)
        self._schedule_waiting(batch, self.cfg.max_num_batched_tokens - decoding)
        admitted = batch.seqs[decoding:]
        self._start(admitted)
        if admitted and decoding:  # the decode rows' tokens come from the device
            batch.known_on_device, batch.num_admitted = True, len(admitted)

    def schedule_verify_continuation(
        self, prev: ScheduledBatch, drafts: dict[int, list[int]]
    ) -> ScheduledBatch | None:
        """The verify step after the verify step ``prev`` while ``prev``'s tokens are still on
        the device, as if every sequence accepts all its drafts: each computes the token
        ``prev`` samples after its last draft (``known_on_device``) and ``drafts[seq_id]``.
        Should a sequence accept fewer, the engine rolls this step back
        (``KVCacheManager.rollback``) and discards it. Returns None, changing nothing, when a
        sequence of ``prev`` has no drafts here or may finish with ``prev``'s tokens, when a
        prompt could be admitted, or when blocks or budget run short: the step then waits for
        ``prev``.
        """
        if not self._may_continue(prev):
            return None
        planned = []
        for item in prev.seqs:
            emitted = len(item.draft_token_ids) + 1  # by prev, if it accepts every draft
            room = max(0, self._room_for_drafts(item.seq, emitted))
            chain = drafts.get(item.seq.seq_id, [])[:room]
            if not chain:
                return None
            planned.append((item.seq, chain, 1 + len(chain)))
        return self._continue(planned, ScheduledBatch(known_on_device=True))

    def schedule_device_continuation(
        self, prev: ScheduledBatch, num_drafts: int
    ) -> ScheduledBatch | None:
        """The verify step after ``prev`` whose inputs ``prev``'s tail stages on the device (the
        device drafter): each sequence computes the token ``prev`` samples last and
        ``num_drafts`` drafts proposed on the device after it, placeholders here until
        ``prev``'s outputs bring them; its positions here assume ``prev`` accepts every draft
        and the engine rewinds them to the real ones then. Blocks are reserved as far as the
        step after this one can reach: this step's tail stages that one's slots from the tables
        copied with this step. None, changing nothing, where the host must take the next step:
        a sequence of ``prev`` without a full chain, one whose next two steps would pass the
        context, a prompt that could be admitted, short blocks or budget."""
        if not self._may_continue(prev):
            return None
        q = 1 + num_drafts
        planned = []
        for item in prev.seqs:
            emitted = len(item.draft_token_ids) + 1
            if len(item.draft_token_ids) != num_drafts or (
                self._room_for_drafts(item.seq, emitted + q) < num_drafts
                or item.seq.num_computed_tokens + 2 * q > self.cfg.max_model_len  # the reserve
            ):  # fmt: skip
                return None
            planned.append((item.seq, [0] * num_drafts, 2 * q))
        batch = ScheduledBatch(known_on_device=True, staged_on_device=True, device_tail=True)
        return self._continue(planned, batch)

    def _admission_pending(self) -> bool:
        """Whether a waiting prompt could join the next step (a sequence slot is free): a plain
        decode step launched ahead admits it (``_admit_ahead``); a verify step launched ahead
        would keep it out. Behind a full batch it waits for a sequence to finish anyway, and
        once one has, the running set differs from the last step's, so the host takes the next
        step and admits it: until then steps may run ahead."""
        return bool(self.waiting) and len(self.running) < self.cfg.max_num_seqs

    def _may_continue(self, prev: ScheduledBatch) -> bool:
        """Whether a step may launch behind ``prev`` before its tokens reach the host: every
        running sequence is in ``prev``, drafted and still running, and no prompt could be
        admitted."""
        if prev.preempted or self._admission_pending() or len(prev.seqs) != len(self.running):
            return False
        return all(
            item.samples and item.draft_token_ids and item.seq.status is SequenceStatus.RUNNING
            for item in prev.seqs
        )

    def _continue(
        self, planned: list[tuple[Sequence, list[int], int]], batch: ScheduledBatch
    ) -> ScheduledBatch | None:
        """``batch`` of ``(seq, drafts, tokens to reserve)`` items, each computing its known
        token (from the device) and its drafts; None, changing nothing, when the step's
        tokens pass the budget or the reserves the free blocks."""
        if sum(1 + len(chain) for _, chain, _ in planned) > self.cfg.max_num_batched_tokens:
            return None
        needed = sum(self.kv.blocks_needed(seq, reserve) for seq, _, reserve in planned)
        if needed > self.kv.num_free_blocks:
            return None
        for seq, chain, reserve in planned:
            self.kv.allocate(seq, reserve)
            item = ScheduledSeq(seq, seq.num_computed_tokens, 1, samples=True,
                                draft_token_ids=chain)  # fmt: skip
            seq.num_computed_tokens += item.num_scheduled_tokens
            batch.seqs.append(item)
            self._count(item)
        return batch

    def _room_for_drafts(self, seq: Sequence, pending: int) -> int:
        """How many drafts a step may carry after ``pending`` more tokens of ``seq``: accepting
        them all and the token after them must pass neither ``max_tokens`` nor the context.
        With full chains, the context alone: a draft past ``max_tokens`` costs a row that a
        filler would take anyway, and a full chain keeps the step in its graph and its
        successor staged on the device to the request's end; tokens past ``max_tokens`` are
        never appended (the output processor finishes the sequence there, as at an EOS)."""
        room = self.cfg.max_model_len - (seq.num_tokens + pending) - 1
        return room if self.full_chains else seq.cap_drafts(room, pending)

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

    def _schedule_drafts(self, batch: ScheduledBatch, budget: int) -> int:
        """Give running sequences' drafts the budget and blocks their known tokens left.

        Drafts are optional work: they never preempt, nor take a block or a token that a
        known token of this step needed. Oldest sequences first, as the running set.
        """
        for item in batch.seqs:
            if budget <= 0:
                break
            if item.seq.draft_token_ids and item.samples:
                item.draft_token_ids = self._fit_drafts(item, budget)
                budget -= len(item.draft_token_ids)
                # Fillers trail the proposal, so a cut chain loses them first.
                cut = len(item.seq.draft_token_ids) - len(item.draft_token_ids)
                item.num_fillers = max(0, item.seq.num_draft_fillers - cut)
                tree = item.seq.draft_tree  # a leading slice of a tree's nodes is a tree
                if tree is not None and item.draft_token_ids:
                    item.draft_tree = tree.truncated(len(item.draft_token_ids))
                probs = item.seq.draft_probs
                if probs is not None and item.draft_token_ids:
                    item.draft_probs = probs[: len(item.draft_token_ids)]
        return budget

    def _fit_drafts(self, item: ScheduledSeq, budget: int) -> list[int]:
        """The leading drafts that fit the budget, the context, ``max_tokens`` and free blocks."""
        seq = item.seq
        num = min(len(seq.draft_token_ids), budget, self._room_for_drafts(seq, 0))
        held = len(seq.block_table) + self.kv.num_free_blocks
        end = item.start + item.num_new_tokens
        num = min(num, held * self.kv.block_size - end)
        if num <= 0 or not self.kv.allocate(seq, item.num_new_tokens + num):
            return []
        return seq.draft_token_ids[:num]

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
        self.stats.num_decode_tokens_computed += len(item.draft_token_ids)
        if item.num_new_tokens == 1 and item.samples and item.seq.num_output_tokens > 0:
            self.stats.num_decode_tokens_computed += 1
        else:
            self.stats.num_prefill_tokens_computed += item.num_new_tokens


def _can_run_ahead(seq: Sequence) -> bool:
    """Whether the sequence's next token can be sampled before its last one is on the host."""
    p = seq.params
    # Counted without the pending token, as the runner counts when it bans stop ids. Drafts
    # proposed for it call for a step of their own.
    return p.history_free and not seq.bans_stop_tokens and not seq.draft_token_ids


def _finishes_with_next_token(seq: Sequence, max_model_len: int) -> bool:
    """True when the token being sampled ends the sequence whatever it is."""
    p = seq.params
    if p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens:
        return True
    return seq.num_tokens + 1 >= max_model_len
