"""Prompt logprobs (``SamplingParams.prompt_logprobs``): the log-probability of every prompt token
given the tokens before it, with the top-k alternatives, from the logits of every prompt position.

A step normally computes logits only where a sequence samples. For a sequence that asks for prompt
logprobs, the runner also scores the rows of its prompt chunk: the hidden state at position ``p``
predicts token ``p + 1``. Chunks arrive in order from position 0 (such a sequence takes no prefix
cache hits while it still needs prompt logprobs, see ``Sequence.wants_prompt_logprobs``), and
tokens already scored (before a preemption) are not scored again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from parallm.engine.request import Sequence
from parallm.engine.sampler import token_logprobs
from parallm.engine.scheduler import ScheduledBatch

# Rows of float32 logits scored at once: bounds the extra memory of a long prompt chunk
# (with a 150k vocabulary, 1024 rows are 0.6 GB) whatever max_num_batched_tokens is.
_MAX_LOGIT_ELEMENTS = 1 << 27


@dataclass
class PromptSpan:
    """Prompt tokens ``first .. first + len(targets) - 1`` of one sequence, scored from the
    step's hidden-state rows ``rows``."""

    seq: Sequence
    first: int
    rows: np.ndarray
    targets: list[int]


@dataclass
class PromptScores:
    """The scores of one span, on the host: per token its logprob, 1-based rank among the
    vocabulary and the top ``k`` (ids, logprobs), ``k`` being the request's prompt_logprobs."""

    seq: Sequence
    first: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def prompt_spans(batch: ScheduledBatch, query_start_loc: np.ndarray) -> list[PromptSpan]:
    """What this step scores: for each sequence that wants prompt logprobs, the prompt tokens
    its chunk predicts and has not scored yet."""
    spans = []
    for i, item in enumerate(batch.seqs):
        seq = item.seq
        if not seq.wants_prompt_logprobs:
            continue
        # Row j of the chunk is position start + j and predicts token start + j + 1.
        first = max(item.start + 1, len(seq.prompt_logprobs))
        end = min(item.start + item.num_new_tokens + 1, seq.num_prompt_tokens)
        if first >= end:
            continue
        offset = int(query_start_loc[i]) + first - 1 - item.start
        rows = np.arange(offset, offset + end - first, dtype=np.int64)
        spans.append(PromptSpan(seq, first, rows, seq.prompt_token_ids[first:end]))
    return spans


def span_rows(spans: list[PromptSpan]) -> np.ndarray:
    """The hidden-state rows the spans score, in scoring order."""
    return np.concatenate([s.rows for s in spans])


def prompt_logit_chunks(
    model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor | np.ndarray
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row index, logits) of ``rows`` in bounded chunks; a tensor-parallel worker runs
    the same chunks as the driver, so that their LM-head collectives pair up."""
    rows = torch.as_tensor(rows, device=hidden.device)
    step = max(1, _MAX_LOGIT_ELEMENTS // model.config.vocab_size)
    for lo in range(0, len(rows), step):
        yield lo, model.compute_logits(hidden[rows[lo : lo + step]])


@torch.no_grad()
def score_prompt_spans(
    model: nn.Module, hidden: torch.Tensor, spans: list[PromptSpan]
) -> list[PromptScores]:
    """Logprobs of the spans' tokens under the raw logits of their rows (float32)."""
    rows = torch.from_numpy(span_rows(spans)).to(hidden.device)
    targets = torch.tensor(
        [t for s in spans for t in s.targets], dtype=torch.long, device=hidden.device
    )
    k = max(s.seq.params.prompt_logprobs for s in spans)
    parts = [
        token_logprobs(raw.float(), targets[lo : lo + len(raw)], k)
        for lo, raw in prompt_logit_chunks(model, hidden, rows)
    ]

    def joined(column: str) -> list:
        return torch.cat([getattr(p, column) for p in parts]).tolist()

    logprobs, ranks = joined("logprobs"), joined("ranks")
    no_top = [[]] * len(ranks)  # k == 0: the sampler computes no top-k columns
    top_ids = joined("top_token_ids") if k else no_top
    top_lps = joined("top_logprobs") if k else no_top
    out, lo = [], 0
    for s in spans:
        hi = lo + len(s.targets)
        want = s.seq.params.prompt_logprobs
        out.append(PromptScores(
            s.seq, s.first, logprobs[lo:hi], ranks[lo:hi],
            [ids[:want] for ids in top_ids[lo:hi]], [lps[:want] for lps in top_lps[lo:hi]],
        ))  # fmt: skip
        lo = hi
    return out
