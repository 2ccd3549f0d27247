"""Counters of speculative decoding: drafts proposed and accepted, by position."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """``accepted_per_position[i]``: how many proposals had their draft ``i`` accepted."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    num_proposals: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        """One sequence's step: ``proposed`` drafts, the first ``accepted`` of them kept."""
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.num_proposals += 1
        missing = proposed - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(0, missing)
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens a drafted sequence emitted per step on average (accepted drafts plus one)."""
        return self.mean_since(SpecStats())

    def mean_since(self, before: SpecStats) -> float:
        """:attr:`mean_accepted_per_step` of the proposals made after ``before`` (a copy)."""
        proposals = self.num_proposals - before.num_proposals
        accepted = self.accepted_tokens - before.accepted_tokens
        return 1 + accepted / proposals if proposals else 0.0

    def copy(self) -> SpecStats:
        return SpecStats(self.draft_tokens, self.accepted_tokens, self.num_proposals,
                         list(self.accepted_per_position))  # fmt: skip
