"""When a request should stop drafting: its running tokens per drafted step are too few.

A drafted step costs more than a plain one (k more query rows, the drafter's own work), so it
pays only while a sequence emits enough tokens per step. Each sequence keeps an exponential
moving average of the tokens its verified steps emitted (accepted drafts plus one); below the
threshold it stops drafting, and drafts again in the drafter's probe steps (one in
``PROBE_EVERY + 1``) to notice when its text becomes predictable again (code that repeats a
pattern, a quoted passage). Paused requests probe in the same steps: a step with any drafts
costs a drafted step for the whole batch, so probes spread over different steps would make many
steps drafted ones. Between probes, a batch whose requests have all paused runs ahead as plain
decoding does (async scheduling), its steps counted on the beat. The threshold is the
break-even tokens per step, set by the user (what ``benchmarks/spec_oracle_bench.py``
measures) or measured by the engine (spec/step_costs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest step in the moving average: about the last 3-4 steps dominate.
SMOOTHING = 0.3
# Paused sequences draft again after this many plain steps (the drafter's probe beat).
PROBE_EVERY = 8


def is_probe_step(step: int) -> bool:
    """Whether the drafter's ``step``-th proposal (from 1) is a probe step."""
    return step % (PROBE_EVERY + 1) == 0


@dataclass
class DraftHistory:
    """One sequence's running tokens per drafted step, and whether its last verified step
    accepted every draft (the gate of a verify step launched ahead)."""

    mean_tokens_per_step: float | None = None
    accepted_all: bool = False

    def record(self, accepted: int, proposed: int | None = None) -> None:
        """A verified step emitted ``accepted`` of its ``proposed`` drafts plus one token."""
        self.accepted_all = accepted == proposed
        tokens = 1.0 + accepted
        if self.mean_tokens_per_step is None:
            self.mean_tokens_per_step = tokens
        else:
            self.mean_tokens_per_step += SMOOTHING * (tokens - self.mean_tokens_per_step)

    def paused(self, min_tokens_per_step: float | None) -> bool:
        """Whether the sequence is below the threshold (drafts only in probe steps)."""
        mean = self.mean_tokens_per_step
        return min_tokens_per_step is not None and mean is not None and mean < min_tokens_per_step

    def should_draft(self, min_tokens_per_step: float | None, probe: bool) -> bool:
        """Whether to draft this step: at or above the threshold, or in a probe step."""
        return probe or not self.paused(min_tokens_per_step)
