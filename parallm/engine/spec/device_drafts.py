"""The device drafter's state: each drafted sequence's tokens on the device, and the tail that
a verify step runs after its forward so that the next verify step needs nothing from the host.

In device mode (greedy prompt lookup under async scheduling, every sequence a full chain of k
drafts in a captured verify shape) a verify step of ``B`` sequences, ``q = k + 1`` rows each,
is followed on the device by: every row's argmax, its acceptance (``greedy_accept``: the
emitted tokens appended to each sequence's tokens here), the next drafts (``prompt_lookup`` over
those tokens) and the next step's inputs staged into the shape's buffers (``stage_chain_step``),
then the drafts copied to the host, where the engine gives them to the step it launched behind
this one. With a ring of earlier requests (``history``, spec/history.py) the rows whose own
lookup found nothing draft from the ring's device copy (``history_lookup``), as the host
drafter falls back to it. Rows follow the batch's order; a step staged from the host first
uploads every sequence's tokens (``upload``). The Triton kernels run on CUDA, captured in one
graph per batch size where the verify graphs are (spec/tail_graphs.py); elsewhere (the CPU
tests) their PyTorch twins run, in place. See docs/DEVICE_DRAFTER.md.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

from parallm.engine.request import Sequence
from parallm.engine.sampler import greedy_argmax
from parallm.engine.spec.history import history_ngram_range
from parallm.kernels import reference

if TYPE_CHECKING:
    from parallm.engine.spec.history import TokenHistory
    from parallm.engine.spec.tail_graphs import TailGraphs


class DeviceDrafts:
    """Token buffers for up to ``max_batch`` sequences of up to ``max_len`` tokens, drafting
    ``num_drafts`` tokens a step by prompt lookup with n-grams of ``min_n``..``max_n``, then
    from ``history`` (the drafter's ring, or None) where that found nothing."""

    def __init__(self, max_batch: int, max_len: int, num_drafts: int, min_n: int, max_n: int,
                 device: torch.device, fused: bool = False,
                 history: TokenHistory | None = None) -> None:  # fmt: skip
        self.num_drafts, self.min_n, self.max_n = num_drafts, min_n, max_n
        self.device = device
        self.fused = fused  # the argmax's Triton kernel (``greedy_argmax``)
        ints = dict(dtype=torch.int32, device=device)
        self.tokens = torch.zeros((max_batch, max_len), **ints)
        self.lengths = torch.zeros((max_batch,), **ints)
        self.drafts = torch.zeros((max_batch, num_drafts), **ints)
        self.counts = torch.zeros((max_batch,), **ints)
        self.full = torch.full((max_batch,), num_drafts, **ints)  # every chain is k long
        self.accepted = torch.zeros((max_batch,), **ints)
        self.cuda = device.type == "cuda"
        self.latest = None
        if self.cuda:
            from parallm.kernels.prompt_lookup import lookup_buffer  # imports triton

            self.latest = lookup_buffer(max_batch, max_n, device)
        self._init_history(history)
        # Two host rows, taken in turn: a step's drafts are read when it finishes, after the
        # step behind it (whose tail writes the other row) has launched, never later. Each
        # sequence's row: its k drafts (the lookup's, then fillers), then how many the lookup
        # found (the rest are fillers, no proposal: the counters leave them out).
        self.host_drafts = torch.zeros((2, max_batch, num_drafts + 1), dtype=torch.int32,
                                       pin_memory=self.cuda)  # fmt: skip
        self.turn = 0
        # The tail captured per batch size (``capture_tails``), or None: always eager.
        self.graphs: TailGraphs | None = None

    def _init_history(self, history: TokenHistory | None) -> None:
        """The ring on the device (its address fixed: a tail graph reads it) and the history
        lookup's scratch."""
        self.history, self.newest = history, None
        if history is None:
            return
        self.history_n = history_ngram_range(self.min_n, self.max_n)
        history.to_device(self.device)
        if self.cuda:
            from parallm.kernels.prompt_lookup import lookup_buffer  # imports triton

            self.newest = lookup_buffer(self.max_batch, self.history_n[1], self.device)

    @property
    def max_batch(self) -> int:
        return self.tokens.shape[0]

    def fits(self, seqs: Seq[Sequence]) -> bool:
        """Whether these sequences (and the tokens two more steps add) fit the buffers."""
        longest = max((s.num_tokens for s in seqs), default=0)
        return len(seqs) <= self.max_batch and longest + 2 * (1 + self.num_drafts) <= (
            self.tokens.shape[1]
        )  # fmt: skip

    def upload(self, seqs: Seq[Sequence]) -> None:
        """Each sequence's known tokens into its row (a step staged from the host)."""
        width = max(s.num_tokens for s in seqs)
        # Fresh pinned memory (on CUDA): the copies run behind the host, and PyTorch's host
        # allocator keeps a block until the copies that read it are done.
        tokens = torch.zeros((len(seqs), width), dtype=torch.int32, pin_memory=self.cuda)
        for row, seq in zip(tokens.numpy(), seqs, strict=True):
            row[: seq.num_tokens] = seq.token_ids
        lengths = torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32)
        self.tokens[: len(seqs), :width].copy_(tokens, non_blocking=True)
        self.lengths[: len(seqs)].copy_(lengths.pin_memory() if self.cuda else lengths,
                                        non_blocking=True)  # fmt: skip

    def tail(self, logits: torch.Tensor, buffers, batch: int, block_size: int,
             scratch_slot: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """After a verify step of ``batch`` sequences (``logits``: its ``batch * q`` rows) in a
        shape whose static buffers are ``buffers`` (``_VerifyInputs``): every row's argmax,
        then accept, append, draft, stage the next step there. One graph replay when a tail
        graph holds the step (spec/tail_graphs.py), else eagerly. Returns the argmax rows and
        the host rows that the next drafts are being copied into, each ``k`` drafts then the
        lookup's count (valid once the step's event completes). A replay's argmax is its
        graph's static tensor: it must be read (copied) before the next tail runs."""
        graphs = self.graphs
        if graphs is not None and graphs.holds(logits, buffers, batch):
            argmax = graphs.replay(batch)
        else:
            argmax = self.run_tail(logits, buffers, batch, block_size, scratch_slot)
        return argmax, self._to_host(batch)

    def run_tail(self, logits: torch.Tensor, buffers, batch: int, block_size: int,
                 scratch_slot: int) -> torch.Tensor:  # fmt: skip
        """The tail's device work, eagerly (what a tail graph captures): the argmax rows of
        ``logits``, then acceptance, lookup and staging on rows ``0 .. batch - 1``. Touches
        no host memory and makes no host sync on CUDA."""
        argmax = greedy_argmax(logits, self.fused)
        self._accept_and_stage(argmax, buffers, batch, block_size, scratch_slot)
        return argmax

    def _accept_and_stage(self, argmax_rows: torch.Tensor, buffers, batch: int, block_size: int,
                          scratch_slot: int) -> None:  # fmt: skip
        """Acceptance, the next drafts and the next step's inputs staged in ``buffers``
        (its rows for sequences ``0 .. batch - 1``; padding sequences' rows untouched)."""
        q = 1 + self.num_drafts
        rows = slice(0, batch)
        step_ids = buffers.input_ids[: batch * q]
        out = dict(input_ids=buffers.input_ids, positions=buffers.positions,
                   slot_mapping=buffers.slot_mapping, sample_rows=buffers.sample_rows,
                   seq_lens=buffers.seq_lens)  # fmt: skip
        args = (self.tokens[rows], self.lengths[rows])
        if self.cuda:
            from parallm.kernels.greedy_accept import greedy_accept
            from parallm.kernels.prompt_lookup import prompt_lookup
            from parallm.kernels.verify_stage import stage_chain_step

            greedy_accept(argmax_rows[: batch * q], step_ids, self.full[rows], *args,
                          accepted=self.accepted[rows])  # fmt: skip
            prompt_lookup(*args, self.num_drafts, self.min_n, self.max_n,
                          latest=self.latest[rows], drafts=self.drafts[rows],
                          counts=self.counts[rows])  # fmt: skip
            self._history_lookup(args, rows)
            stage_chain_step(*args, self.drafts[rows], self.full[rows], buffers.block_tables,
                             out, block_size, scratch_slot)  # fmt: skip
        else:
            self.accepted[rows] = reference.greedy_accept_ref(
                argmax_rows[: batch * q], step_ids, self.full[rows], *args
            )
            drafts, counts = reference.prompt_lookup_ref(*args, self.num_drafts, self.min_n,
                                                          self.max_n)  # fmt: skip
            self.drafts[rows], self.counts[rows] = drafts, counts
            self._history_lookup(args, rows)
            reference.stage_chain_step_ref(*args, self.drafts[rows], self.full[rows],
                                           buffers.block_tables, out, block_size,
                                           scratch_slot)  # fmt: skip

    def _history_lookup(self, args: tuple[torch.Tensor, torch.Tensor], rows: slice) -> None:
        """Drafts from the ring for the rows whose own lookup found none (in place)."""
        history = self.history
        if history is None:
            return
        ring = (history.device_ring, history.device_state)
        drafts, counts = self.drafts[rows], self.counts[rows]
        if self.cuda:
            from parallm.kernels.history_lookup import history_lookup

            history_lookup(*args, *ring, drafts, counts, self.num_drafts, *self.history_n,
                           newest=self.newest[rows], index=history.device_index)  # fmt: skip
        else:
            reference.history_lookup_ref(*args, *ring, drafts, counts, self.num_drafts,
                                         *self.history_n)  # fmt: skip

    def _to_host(self, batch: int) -> torch.Tensor:
        """The next drafts and counts of rows ``0 .. batch - 1`` copied into the other host
        row (outside any graph: the row alternates between steps)."""
        rows = slice(0, batch)
        self.turn ^= 1
        host = self.host_drafts[self.turn, rows]
        host[:, : self.num_drafts].copy_(self.drafts[rows], non_blocking=True)
        host[:, self.num_drafts].copy_(self.counts[rows], non_blocking=True)
        return host

    def reset(self) -> None:
        """The device state as constructed (every row empty, the lookup's scratch "none"):
        after a tail graph's warm-up ran the tail on whatever the buffers held."""
        for buffer in (self.tokens, self.lengths, self.drafts, self.counts, self.accepted):
            buffer.zero_()
        if self.latest is not None:
            from parallm.kernels.prompt_lookup import lookup_buffer

            self.latest.copy_(lookup_buffer(self.max_batch, self.max_n, self.device))
        if self.newest is not None:  # (the ring is the drafter's: it keeps its sequences)
            from parallm.kernels.prompt_lookup import lookup_buffer

            self.newest.copy_(lookup_buffer(self.max_batch, self.history_n[1], self.device))
