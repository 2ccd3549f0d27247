"""When a whole batch size should stop drafting (``speculative_config.min_tokens_per_step =
"auto"``): its drafted steps emit fewer tokens a sequence than they cost.

Pausing single requests (spec/throttle.py, a numeric threshold) splits a batch between drafting
and non-drafting requests. Such a step is still a drafted one for the whole batch, and a split
batch cannot run the device drafter's captured chain, so the steps after a pause are neither
overlapped nor cheaper. Here the decision is per batch-size bucket (spec/step_costs.py's
buckets, whose break-even it is compared with): every request of a step drafts, or none does.

Per bucket, each drafted step gives the mean over its sampled sequences of the tokens it
emitted for them: accepted drafts plus one where the drafter proposed, one where it did not (a
chain of fillers only, a sequence without drafts): one token is what the step cost them. The
bucket's measure is the plain mean of its first ``WARMUP_STEPS`` drafted steps, then an
exponential moving average of weight ``SMOOTHING``. The average is long on purpose: prompt
lookup drafts in bursts, and a few steps without matches must not pause a batch whose text
will be copied again. From ``WARMUP_STEPS`` drafted steps on, a measure below the bucket's
break-even pauses the bucket for ``PAUSE_STEPS`` engine steps (any bucket's); then it drafts
again and is measured afresh. A bucket without a break-even yet is never paused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parallm.engine.spec.step_costs import bucket

# Drafted steps a bucket's measure averages before it may pause the bucket.
WARMUP_STEPS = 16
# Weight of the newest drafted step once the warm-up is over: about the last 20 steps.
SMOOTHING = 1 / 20
# Engine steps a paused bucket decodes plainly before it drafts again.
PAUSE_STEPS = 256


def step_tokens(proposed: int, accepted: int) -> int:
    """What a drafted step emitted for one sequence with ``proposed`` drafts, ``accepted`` of
    them kept, as a bucket counts it: accepted drafts plus one, or one without a proposal (a
    chain of fillers only, or no drafts), even where a filler matched: the step then cost the
    sequence a drafted step for plain decoding's one token, and a lucky filler is no reason
    to keep drafting."""
    return 1 + accepted if proposed else 1


@dataclass
class BucketMeasure:
    """One bucket's tokens a sequence per drafted step since it last (re)started drafting."""

    mean: float = 0.0
    steps: int = 0

    def add(self, tokens_per_seq: float) -> None:
        self.steps += 1
        # 1/steps during the warm-up makes ``mean`` the plain mean of the steps so far.
        weight = 1 / self.steps if self.steps <= WARMUP_STEPS else SMOOTHING
        self.mean += weight * (tokens_per_seq - self.mean)


class BatchThrottle:
    """Which batch-size buckets are paused, by their measured tokens per drafted step."""

    def __init__(self) -> None:
        self.now = 0  # engine steps counted (``tick``): the pauses' clock
        self.measures: dict[int, BucketMeasure] = {}
        self._paused_until: dict[int, int] = {}  # bucket -> the clock at which it drafts again
        self.num_pauses = 0  # pauses started, for the engine's stats

    def tick(self) -> None:
        """One engine step launched."""
        self.now += 1

    def paused(self, batch_size: int) -> bool:
        """Whether a step of ``batch_size`` sequences must carry no drafts."""
        return self.now < self._paused_until.get(bucket(batch_size), 0)

    @property
    def num_paused(self) -> int:
        """Buckets paused now."""
        return sum(self.now < until for until in self._paused_until.values())

    def record(self, batch_size: int, tokens: Sequence[int], break_even: float | None) -> None:
        """A drafted step of ``batch_size`` sequences emitted ``tokens`` for each sampled
        sequence (as counted above); ``break_even``: the bucket's, None until measured."""
        if not tokens or self.paused(batch_size):
            return  # a step launched before its bucket paused: the pause has reset the measure
        b = bucket(batch_size)
        measure = self.measures.setdefault(b, BucketMeasure())
        measure.add(sum(tokens) / len(tokens))
        warm = measure.steps >= WARMUP_STEPS
        if warm and break_even is not None and measure.mean < break_even:
            self._pause(b)

    def _pause(self, b: int) -> None:
        self._paused_until[b] = self.now + PAUSE_STEPS
        # Measured afresh when it drafts again: the load or the text may have changed.
        del self.measures[b]
        self.num_pauses += 1
