"""A verified step's tokens into their sequences: the rejected drafts' KV slots given back, the
counters fed, then the emitted tokens appended one position at a time."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from parallm.engine.output_processor import OutputProcessor
from parallm.engine.request import Sequence
from parallm.engine.sampler import SamplerOutput
from parallm.engine.scheduler import ScheduledBatch
from parallm.engine.spec.stats import SpecStats


def append_verified(
    outputs: OutputProcessor, take_back: Callable[[Sequence, int], None], stats: SpecStats,
    batch: ScheduledBatch, sampled: list[Sequence], result: SamplerOutput,
) -> tuple[list[Sequence], int]:  # fmt: skip
    """Append every token ``result`` emitted for ``sampled`` (``batch``'s sampled sequences),
    one position at a time, so that stop checks, ``max_tokens`` and streaming see them as
    consecutive steps; first ``take_back(seq, n)`` the KV slots of each one's ``n`` rejected
    drafts. The sequences that finished, and how many tokens were appended."""
    emitted = result.spec_token_ids
    _count_drafts(take_back, stats, batch, sampled, emitted)
    finished: list[Sequence] = []
    appended = 0
    # Row of sequence i's token j >= 1 in ``result.spec_logprobs``: later[i] + j - 1.
    later = list(itertools.accumulate((len(t) - 1 for t in emitted), initial=0))
    for j in range(max(map(len, emitted), default=0)):
        # A sequence that stopped at an earlier token of this run (its finish_reason is set;
        # the scheduler finishes it after this step) takes no more of them.
        rows = [i for i, t in enumerate(emitted)
                if len(t) > j and sampled[i].finish_reason is None]  # fmt: skip
        if not rows:
            break
        seqs = [sampled[i] for i in rows]
        if result.logprobs is None:  # the tokens are on the host already
            finished += outputs.append_tokens(seqs, [emitted[i][j] for i in rows])
        elif j == 0:  # the first tokens carry the sampler's logprobs
            step = result if len(rows) == len(sampled) else result.select(rows)
            finished += outputs.process(seqs, step)
        else:  # and so do the later ones
            step = result.spec_logprobs.select([later[i] + j - 1 for i in rows])
            finished += outputs.process(seqs, step)
        appended += len(rows)
    return finished, appended


def _count_drafts(
    take_back: Callable[[Sequence, int], None], stats: SpecStats, batch: ScheduledBatch,
    sampled: list[Sequence], emitted: list[list[int]],
) -> None:  # fmt: skip
    """Give back each sequence's rejected drafts' slots and count its proposal."""
    drafts = {item.seq.seq_id: item.draft_token_ids for item in batch.seqs if item.samples}
    proposed_by = {item.seq.seq_id: item.num_proposed for item in batch.seqs if item.samples}
    for seq, tokens in zip(sampled, emitted, strict=True):
        verified = len(drafts[seq.seq_id])
        if verified:
            take_back(seq, verified - (len(tokens) - 1))
        # A full chain's fillers (device mode) were verified but never proposed, and its drafts
        # past ``max_tokens`` can never be emitted: the counters see the proposal alone, as the
        # host drafter would have made it (cut at ``max_tokens``).
        proposed = max(0, seq.cap_drafts(proposed_by[seq.seq_id]))
        if proposed:
            accepted = min(len(tokens) - 1, proposed)
            stats.record(proposed, accepted)
            seq.draft_history.record(accepted, proposed)
