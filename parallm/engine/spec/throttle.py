"""When a request should stop drafting: its running tokens per drafted step are too few.

A drafted step costs more than a plain one (k more query rows, the drafter's own work), so it
pays only while a sequence emits enough tokens per step. Each sequence keeps an exponential
moving average of the tokens its verified steps emitted (accepted drafts plus one); below the
threshold it stops drafting, and drafts once every ``PROBE_EVERY`` steps to notice when its
text becomes predictable again (code that repeats a pattern, a quoted passage). The threshold
is the break-even tokens per step that ``benchmarks/spec_oracle_bench.py`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest step in the moving average: about the last 3-4 steps dominate.
SMOOTHING = 0.3
# A paused sequence drafts again after this many plain steps.
PROBE_EVERY = 8


@dataclass
class DraftHistory:
    """One sequence's running tokens per drafted step, and plain steps since it paused."""

    mean_tokens_per_step: float | None = None
    steps_paused: int = 0

    def record(self, accepted: int) -> None:
        """A verified step emitted ``accepted`` drafts plus one token."""
        tokens = 1.0 + accepted
        if self.mean_tokens_per_step is None:
            self.mean_tokens_per_step = tokens
        else:
            self.mean_tokens_per_step += SMOOTHING * (tokens - self.mean_tokens_per_step)
        self.steps_paused = 0

    def should_draft(self, min_tokens_per_step: float | None) -> bool:
        """Whether to draft this step; counts a plain step when it says no."""
        mean = self.mean_tokens_per_step
        if min_tokens_per_step is None or mean is None or mean >= min_tokens_per_step:
            return True
        self.steps_paused += 1
        return self.steps_paused > PROBE_EVERY
