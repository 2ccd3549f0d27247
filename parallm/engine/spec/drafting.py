"""Which sequences get draft tokens this step, and from which drafter.

Speculation pays when a sequence's next tokens are cheap to guess and the step has room to
verify them; it must never change what a request produces. The runner verifies a draft by
sampling its position exactly as plain decoding would and keeping the draft when they agree
(``DraftVerifier.verify``), so requests whose distribution does not depend on their earlier
output (no penalties) and whose stop tokens are allowed already are drafted, greedy or
sampled, and emit plain decoding's tokens; the logprobs of every emitted token come from the
row it was sampled from. The exception is a draft model's drafts for sampled requests, which
are samples from its distribution, verified by speculative sampling (spec/draft_model.py): the
output keeps the target's distribution, not plain decoding's tokens. Every other request
decodes as usual in the same steps. Above
``disable_by_batch_size`` running sequences a step carries no drafts, and a request whose
drafts have lately been rejected pauses (``min_tokens_per_step``, spec/throttle.py). With
``min_tokens_per_step="auto"`` that threshold is the break-even the engine measures for the
running batch size (spec/step_costs.py), whose plain steps it runs now and then to measure.
With ``prompt_lookup_history_tokens`` the n-gram drafter keeps finished sequences' tokens in a
ring (spec/history.py) and drafts from it where a sequence's own tokens give nothing; with
``prompt_lookup_datastore``, from a tokenized corpus after that (spec/datastore.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Tokens

import numpy as np

from parallm.engine.request import Sequence
from parallm.engine.scheduler import ScheduledBatch
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.draft_model import DraftModelProposer
from parallm.engine.spec.history import TokenHistory, history_ngram_range
from parallm.engine.spec.medusa import MedusaProposer
from parallm.engine.spec.ngram import propose_ngram
from parallm.engine.spec.step_costs import StepCosts
from parallm.engine.spec.throttle import is_probe_step


def draftable(seq: Sequence) -> bool:
    """A decoding sequence (all computed but its last token) whose next tokens do not depend on
    penalties over its output and may be stop tokens."""
    decoding = seq.num_computed_tokens == seq.num_tokens - 1 and seq.num_output_tokens > 0
    return decoding and seq.params.penalty_free and seq.stop_tokens_allowed()


class Drafter:
    """Proposes draft tokens for the running sequences before the scheduler runs."""

    def __init__(
        self,
        config: SpeculativeConfig,
        model: DraftModelProposer | MedusaProposer | None = None,
        datastore: np.ndarray | None = None,
    ) -> None:
        config.check_implemented()
        self.config = config
        # draft_model / layer_skip: a draft model proposes (spec/draft_model.py); medusa: heads
        # on the target's hidden states (spec/medusa.py); None: n-grams.
        self.model = model
        # Measured step costs when the threshold is "auto" (``measure_step_costs``; the engine
        # times its steps into them).
        self.costs: StepCosts | None = None
        self.num_proposals = 0  # steps that could carry drafts: the probe beat counts them
        # Device drafting (the engine's): every prompt-lookup proposal is a full chain of k,
        # filled with token 0 (a filler is kept only where it is the target's own token), so
        # that host- and device-staged steps share one graph shape and layout.
        self.full_chains = False
        # Finished sequences' tokens, then ``datastore``'s (``load_datastore``'s tokens, for
        # ``prompt_lookup_datastore``), drafted from where a sequence's own lookup finds
        # nothing (``prompt_lookup_history_tokens``; None: neither).
        size, self.history = config.prompt_lookup_history_tokens, None
        if size or datastore is not None:
            low, high = config.prompt_lookup_min, config.prompt_lookup_max
            depth = history_ngram_range(low, high)[1]  # the longest n a lookup searches
            self.history = TokenHistory(size, datastore, index_depth=depth)

    def remember(self, finished: Iterable[Sequence]) -> None:
        """Add each finished sequence's prompt and output to the ring (if there is one)."""
        if self.history is None:
            return
        for seq in finished:
            self.history.add(seq.token_ids)

    def measure_step_costs(self, async_scheduling: bool) -> None:
        """Measure step costs for ``min_tokens_per_step="auto"`` (nothing otherwise)."""
        if self.config.min_tokens_per_step == "auto":
            self.costs = StepCosts(async_scheduling)

    def may_draft(self, running: list[Sequence]) -> bool:
        """Whether a step over ``running`` could carry drafts (``propose`` might set some)."""
        limit = self.config.disable_by_batch_size
        if limit is not None and len(running) > limit:
            return False
        return self.costs is None or not self.costs.wants_plain(len(running))

    def will_draft(self, running: list[Sequence]) -> bool:
        """Whether the step after this one may carry drafts, asked when it could run ahead.
        It will not when drafting is off for the batch, or when every running request is
        paused and no probe is due; that step then runs ahead as a plain one and counts on
        the probe beat, as a proposal that drafted nothing."""
        if not self.may_draft(running):
            return False
        threshold = self.threshold(len(running))
        if threshold is None or is_probe_step(self.num_proposals + 1):
            return True
        if not all(s.draft_history.paused(threshold) for s in running):
            return True
        self.num_proposals += 1
        return False

    def drafts_for_all(self, running: list[Sequence], probe: bool = False) -> bool:
        """Whether drafting is on for a batch of ``running`` and the throttle pauses none of
        them (``probe``: a probe step, in which paused requests draft too)."""
        if not self.may_draft(running):
            return False
        threshold = self.threshold(len(running))
        return all(s.draft_history.should_draft(threshold, probe) for s in running)

    def threshold(self, batch_size: int) -> float | None:
        """The least running tokens per drafted step at which a request keeps drafting."""
        if self.costs is None:
            return self.config.min_tokens_per_step
        return self.costs.break_even(batch_size)

    def propose_ahead(self, batch: ScheduledBatch) -> dict[int, list[int]] | None:
        """Drafts for the verify step after ``batch`` (a verify step still on the device), as
        if every draft of ``batch`` is accepted: each sequence's n-gram proposal over its
        tokens and its drafts, whose first token guesses the one ``batch`` samples after them
        (that token itself comes from the device, so a wrong guess costs only the drafts).
        None when that step cannot be proposed ahead: a drafter with a model of its own
        (it needs this step's tokens), drafting off for the batch, a sequence whose last
        verified step rejected a draft (this one would likely be discarded, and its host work
        delay the step that replaces it), one that the throttle pauses, or one without a
        proposal."""
        running = [item.seq for item in batch.seqs]
        if self.model is not None or not all(s.draft_history.accepted_all for s in running):
            return None
        if not self.drafts_for_all(running, is_probe_step(self.num_proposals + 1)):
            return None
        drafts = {}
        for item in batch.seqs:
            tokens = [*item.seq.token_ids, *item.draft_token_ids]
            proposal = self._lookup(tokens, self.config.num_speculative_tokens + 1)
            if len(proposal) < 2:
                return None
            drafts[item.seq.seq_id] = proposal[1:]
        self.num_proposals += 1
        return drafts

    def propose(self, running: list[Sequence]) -> None:
        """Set ``draft_token_ids`` of the running sequences that should speculate this step."""
        if not self.may_draft(running):
            return
        threshold = self.threshold(len(running))
        self.num_proposals += 1
        probe = is_probe_step(self.num_proposals)
        seqs = [s for s in running
                if draftable(s) and s.draft_history.should_draft(threshold, probe)]  # fmt: skip
        if self.model is not None:
            self.model.propose(seqs)
            return
        k = self.config.num_speculative_tokens
        for seq in seqs:
            drafts = self._lookup(seq.token_ids, k)
            fillers = k - len(drafts) if self.full_chains else 0
            seq.draft_token_ids = drafts + [0] * fillers
            seq.num_draft_fillers = fillers

    def _lookup(self, tokens: Tokens[int], k: int) -> list[int]:
        """Up to ``k`` prompt-lookup drafts after ``tokens``: from the sequence's own tokens,
        else from the ring of earlier requests (as the device drafter's tail does)."""
        low, high = self.config.prompt_lookup_min, self.config.prompt_lookup_max
        drafts = propose_ngram(tokens, k, low, high)
        if drafts or self.history is None:
            return drafts
        return self.history.lookup(tokens, k, *history_ngram_range(low, high))
