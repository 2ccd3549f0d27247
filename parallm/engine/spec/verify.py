"""Verification of a step's drafts: the tokens each drafted sequence emits.

The target scores every draft in one step; each position is then sampled exactly as plain
decoding samples it (one draw of the sequence's random stream per emitted token), and a draft
is kept while it equals the token sampled at its position. The output is plain decoding's,
token for token for greedy and seeded requests, and in distribution otherwise. Drafts that a
draft model sampled from its own distribution go through speculative sampling instead
(``rejection.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from parallm.engine.request import Sequence
from parallm.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    SamplingTensors,
    token_logprobs,
)
from parallm.engine.scheduler import ScheduledBatch, ScheduledSeq
from parallm.engine.spec.rejection import rejection_sample, target_probs
from parallm.engine.spec.tree import DraftTree, move_kv_slots


@dataclass(frozen=True)
class StepRows:
    """Where a verify step's tokens sit: ``query_start_loc`` ``[B+1]`` (each sequence's first
    row), ``slot_mapping`` (each row's KV slot) and the KV caches that accepted tree nodes
    move within."""

    query_start_loc: np.ndarray
    slot_mapping: np.ndarray
    kv_caches: list[torch.Tensor]


@dataclass(frozen=True)
class GreedyChains:
    """A verify step of greedy chains whose walk waits for the host: every row's argmax is
    copied back with the step, and the chains are walked from it when it arrives
    (``emitted``), so the step launches without blocking and the next one can launch behind
    it. ``first``: each sampling sequence's first row; ``drafts``: its chain."""

    first: np.ndarray
    drafts: list[list[int]]
    # The device drafter's tail: the next step's drafts, on their way to pinned host rows (one
    # a sequence: k drafts, then how many the lookup found; read once the step's event
    # completes); None without the tail.
    next_drafts: torch.Tensor | None = None

    def emitted(self, argmax_rows: list[int]) -> list[list[int]]:
        """Each sequence's emitted tokens, as ``DraftVerifier.verify`` walks a greedy chain."""
        return [_walk_chain(argmax_rows[f], d, functools.partial(_row_after, argmax_rows, f))
                for f, d in zip(self.first.tolist(), self.drafts, strict=True)]  # fmt: skip

    def last_rows(self) -> np.ndarray:
        """Each sequence's last row: the one sampled after its last draft."""
        return self.first + np.fromiter(map(len, self.drafts), np.int64, len(self.drafts))


def _row_after(argmax_rows: list[int], first: int, node: int) -> int:
    return argmax_rows[first + 1 + node]


class DraftVerifier:
    """Decides, from a verify step's logits, the tokens each drafted sequence emits."""

    def __init__(
        self,
        sampler: Sampler,
        sampling_row: Callable[[Sequence], SamplingRow],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.sampler = sampler
        self.sampling_row = sampling_row
        self.vocab_size = vocab_size
        self.device = device

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def verify(
        self,
        batch: ScheduledBatch,
        out: SamplerOutput,
        logits: torch.Tensor,
        first: np.ndarray,
        step: StepRows,
        argmax_rows: list[int] | None = None,
    ) -> tuple[SamplerOutput, list[list[int]]]:
        """``out`` with every sampling sequence's emitted tokens (``spec_token_ids``), and the
        logits rows each was sampled from. A chain keeps its drafts while each equals the token
        sampled at its position, then takes the first token that differs (or the one after
        the last draft); a tree walks from its root to the child carrying the token sampled
        at the current node (``DraftTree.walk``), and its accepted nodes' KV moves to the
        slots that follow the last known token.

        Each position is sampled exactly as plain decoding samples it, one draw of the
        sequence's random stream per emitted token: the output is plain decoding's, token for
        token for greedy and seeded requests, and in distribution otherwise. The tokens after
        the first carry their logprobs (``spec_logprobs``) when ``out`` carries the first ones'.
        Drafts sampled from a draft model's distribution (``draft_probs``) are verified by
        speculative sampling instead (``_speculative_sample``). ``argmax_rows``: every row's
        argmax, when the caller read them already (``out`` then holds those of ``first``).
        """
        emitted, rows, moves = [], [], []
        sampling = [(b, item) for b, item in enumerate(batch.seqs) if item.samples]
        tokens_out = out.token_ids.tolist()
        if argmax_rows is None:
            argmax_rows = self._argmax_rows(logits, [item.seq for _, item in sampling])
        for (b, item), start, token in zip(sampling, first.tolist(), tokens_out, strict=True):
            sample_at = functools.partial(self._sample_node, item.seq, logits, start, argmax_rows)
            tree = tree_of(item)
            if item.draft_probs is not None:
                tokens = self._speculative_sample(item, logits, start)
                path = range(len(tokens) - 1)
            elif tree is None:
                tokens = _walk_chain(token, item.draft_token_ids, sample_at)
                path = range(len(tokens) - 1)
            else:
                tokens, path = tree.walk(token, sample_at)
                first_node = int(step.query_start_loc[b + 1]) - len(tree)
                moves += [(first_node + node, first_node + depth)
                          for depth, node in enumerate(path) if node != depth]  # fmt: skip
            emitted.append(tokens)
            rows.append([start] + [start + 1 + node for node in path])
        firsts = [tokens[0] for tokens in emitted]
        if firsts != tokens_out:  # speculative sampling drew some first tokens itself
            out = self._with_first_tokens(out, logits[self._on_device(first)], firsts)
        if moves:
            src, dst = step.slot_mapping[np.array(moves).T]
            move_kv_slots(step.kv_caches, self._on_device(src), self._on_device(dst))
        later = None
        if out.logprobs is not None:
            k = 0 if out.top_token_ids is None else out.top_token_ids.shape[1]
            later = self._later_token_logprobs(logits, rows, emitted, k)
        return dataclasses.replace(out, spec_token_ids=emitted, spec_logprobs=later), rows

    def _speculative_sample(
        self, item: ScheduledSeq, logits: torch.Tensor, start: int
    ) -> list[int]:
        """The tokens emitted by a sequence whose drafts a draft model sampled from
        ``item.draft_probs``: speculative sampling against the distribution plain sampling
        draws from at its rows (spec/rejection.py), on the sequence's generator. The first
        token ``_sample`` drew for it is discarded (a fixed draw, so seeds stay reproducible).

        Every other drafter's drafts are point masses; for those, keeping a draft while it
        equals the token sampled at its position accepts it with the same probability p(x) as
        speculative sampling would, and emits plain decoding's very tokens.
        """
        probs = target_probs(logits[start : start + len(item.draft_token_ids) + 1], item.seq.params)
        return rejection_sample(probs, item.draft_token_ids, item.draft_probs, item.seq.generator)

    def _with_first_tokens(
        self, out: SamplerOutput, first_logits: torch.Tensor, token_ids: list[int]
    ) -> SamplerOutput:
        """``out`` with other first tokens, and their logprobs from their raw logits rows
        ``first_logits`` when ``out`` carries logprobs (with its top-k width)."""
        ids = torch.tensor(token_ids, device=out.token_ids.device)
        if out.logprobs is None:
            return dataclasses.replace(out, token_ids=ids)
        k = 0 if out.top_token_ids is None else out.top_token_ids.shape[1]
        return token_logprobs(first_logits.float(), ids, k)

    def _later_token_logprobs(
        self, logits: torch.Tensor, sampled_rows: list[list[int]], emitted: list[list[int]], k: int
    ) -> SamplerOutput | None:
        """Logprob, rank and top ``k`` of every emitted token after the first, sequence by
        sequence, each from the raw logits of the row it was sampled from (``sampled_rows``),
        as the sampler computes them (with the same ``k`` as the step's first tokens); None if
        there are none.
        """
        rows = [row for seq_rows in sampled_rows for row in seq_rows[1:]]
        if not rows:
            return None
        ids = torch.tensor([t for tokens in emitted for t in tokens[1:]], device=logits.device)
        return token_logprobs(logits[self._on_device(np.array(rows))].float(), ids, k)

    def _sample_node(
        self, seq: Sequence, logits: torch.Tensor, start: int, argmax_rows: list[int] | None,
        node: int,
    ) -> int:  # fmt: skip
        """The token sampled at draft ``node`` (a chain's ``i``-th draft is node ``i``) of the
        sequence whose rows begin at ``start``."""
        return self._sample_at(seq, logits, start + 1 + node, argmax_rows)

    def _argmax_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int] | None:
        """Every row's argmax in one host copy when some sequence samples by plain argmax
        (``_argmax_samples``): its drafts are then checked without a sampler call and a host
        sync per draft. The sampler takes the argmax of the rows widened to float32, which is
        exact: the model dtype's argmax is the same index, without a float32 copy."""
        if not any(map(_argmax_samples, seqs)):
            return None
        return logits.argmax(dim=-1).tolist()

    def _sample_at(
        self, seq: Sequence, logits: torch.Tensor, row: int, argmax_rows: list[int] | None
    ) -> int:
        """The token ``seq`` samples at ``row`` of ``logits``: from ``argmax_rows`` when it
        samples by plain argmax, else as a plain step samples it (``_sample_row``)."""
        if argmax_rows is not None and _argmax_samples(seq):
            return argmax_rows[row]
        return self._sample_row(seq, logits[row])

    def _sample_row(self, seq: Sequence, row: torch.Tensor) -> int:
        """One token of ``seq`` from one row of logits, as a plain step samples it; its
        logprobs, if asked for, come batched from ``_later_token_logprobs``."""
        tensors = SamplingTensors.build([self.sampling_row(seq)], self.vocab_size, self.device)
        tensors.max_num_logprobs = None
        return int(self.sampler(row.float().unsqueeze(0), tensors).token_ids[0])


def _argmax_samples(seq: Sequence) -> bool:
    """Whether the sampler takes ``seq``'s tokens as the plain argmax of the raw logits:
    greedy, no penalties, no banned stop tokens."""
    return seq.params.greedy and seq.params.penalty_free and not seq.bans_stop_tokens


def tree_of(item: ScheduledSeq) -> DraftTree | None:
    """The item's draft tree, or None when its drafts form a chain (the chain path)."""
    tree = item.draft_tree
    return None if tree is None or tree.is_chain else tree


def _walk_chain(first: int, drafts: list[int], sample_at: Callable[[int], int]) -> list[int]:
    """A chain's emitted tokens: each draft kept while it equals the token sampled before it,
    then the token sampled at the first draft that differs (or after the last draft)."""
    tokens = [first]
    for i, draft in enumerate(drafts):
        if tokens[-1] != draft:
            break
        tokens.append(sample_at(i))
    return tokens
