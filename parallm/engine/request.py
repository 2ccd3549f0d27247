"""Request and sequence state. A request holds ``n`` sequences (parallel samples)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from parallm.engine.spec.throttle import DraftHistory
from parallm.outputs import PromptLogprobs, SampleLogprobs
from parallm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from parallm.engine.spec.tree import DraftTree

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request: its tokens, its KV blocks and its progress."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    generator: torch.Generator | None = None
    # Siblings reuse the first sample's prompt blocks even with prefix caching off.
    share_prefix: bool = False
    wait_for: Sequence | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_registered_blocks: int = 0
    num_preemptions: int = 0
    # Proposed next tokens (speculative decoding) for the scheduler to verify after the last
    # known token in the sequence's next step; it takes those that fit and clears the rest.
    draft_token_ids: list[int] = field(default_factory=list)
    # How many of draft_token_ids are fillers (token 0 after the proposal, making a full chain
    # in device mode: spec/drafting.py): no proposal, so the counters leave them out.
    num_draft_fillers: int = 0
    # A tree of drafts (its tokens are draft_token_ids), or None: draft_token_ids form a chain.
    draft_tree: DraftTree | None = None
    # The distributions [len(draft_token_ids), V] the drafts were sampled from, when a draft
    # model sampled them (verified by speculative sampling); None for any other drafts.
    draft_probs: torch.Tensor | None = None
    # Tokens per drafted step lately: whether it keeps drafting (spec/throttle.py).
    draft_history: DraftHistory = field(default_factory=DraftHistory)
    logprobs: SampleLogprobs | None = None
    # One entry per prompt token scored so far (None for the first, which has no context);
    # None when not asked for. Only the first sample of a request computes them.
    prompt_logprobs: PromptLogprobs | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Stage times in time.monotonic() seconds; RequestMetrics combines them per request.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def cap_drafts(self, num_drafts: int, pending: int = 0) -> int:
        """``num_drafts``, or fewer so that after ``pending`` more output tokens, accepting
        them all and the token after them stays within ``max_tokens``. Negative once fewer
        than ``pending + 1`` tokens are left."""
        max_tokens = self.params.max_tokens
        if max_tokens is None:
            return num_drafts
        return min(num_drafts, max_tokens - (self.num_output_tokens + pending) - 1)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt tokens are left to score: they need their logits, so no prefix cache hits."""
        scored = self.prompt_logprobs
        return scored is not None and len(scored) < len(self.prompt_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """Still computing known tokens (prompt, or outputs being recomputed after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def stop_tokens_allowed(self, output_index: int | None = None) -> bool:
        """The ``min_tokens`` rule, the one definition that sampling and the stop check share.

        Output token ``output_index`` (0-based; by default the next one to sample) may be EOS
        or a stop id, and so end the sequence, only when ``min_tokens`` tokens precede it.
        """
        index = self.num_output_tokens if output_index is None else output_index
        return index >= self.params.min_tokens

    @property
    def bans_stop_tokens(self) -> bool:
        """Whether the next token must be sampled with stop ids (and EOS) kept out.

        True exactly when :meth:`banned_stop_token_ids` is not empty (given any EOS id).
        """
        p = self.params
        return not self.stop_tokens_allowed() and (bool(p.stop_token_ids) or not p.ignore_eos)

    def banned_stop_token_ids(self, eos_token_ids: Iterable[int]) -> list[int]:
        """The ids that sampling keeps out of the next token: stop ids, and EOS unless
        ``ignore_eos``, while :meth:`stop_tokens_allowed` says no."""
        if not self.bans_stop_tokens:
            return []
        banned = list(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            banned += eos_token_ids
        return banned

    def append_token(self, token_id: int, now: float | None = None) -> None:
        """Append a sampled token; ``now`` is the step's time (one clock read per step)."""
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        self.last_token_time = time.monotonic() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = self.last_token_time


@dataclass(eq=False)
class Request:
    """A prompt with its sampling parameters and its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
