"""The device drafter's state: each drafted sequence's tokens on the device, and the tail that
a verify step runs after its forward so that the next verify step needs nothing from the host.

In device mode (greedy prompt lookup under async scheduling, every sequence a full chain of k
drafts in a captured verify shape) a verify step of ``B`` sequences, ``q = k + 1`` rows each,
is followed on the device by: its acceptance (``greedy_accept``: the emitted tokens appended to
each sequence's tokens here), the next drafts (``prompt_lookup`` over those tokens) and the next
step's inputs staged into the shape's buffers (``stage_chain_step``), then the drafts copied to
the host, where the engine gives them to the step it launched behind this one. Rows follow the
batch's order; a step staged from the host first uploads every sequence's tokens (``upload``).
The Triton kernels run on CUDA; elsewhere (the CPU tests) their PyTorch twins do, in place.
See docs/DEVICE_DRAFTER.md.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from parallm.engine.request import Sequence
from parallm.kernels import reference


class DeviceDrafts:
    """Token buffers for up to ``max_batch`` sequences of up to ``max_len`` tokens, drafting
    ``num_drafts`` tokens a step by prompt lookup with n-grams of ``min_n``..``max_n``."""

    def __init__(self, max_batch: int, max_len: int, num_drafts: int, min_n: int, max_n: int,
                 device: torch.device) -> None:  # fmt: skip
        self.num_drafts, self.min_n, self.max_n = num_drafts, min_n, max_n
        self.device = device
        ints = dict(dtype=torch.int32, device=device)
        self.tokens = torch.zeros((max_batch, max_len), **ints)
        self.lengths = torch.zeros((max_batch,), **ints)
        self.drafts = torch.zeros((max_batch, num_drafts), **ints)
        self.counts = torch.zeros((max_batch,), **ints)
        self.full = torch.full((max_batch,), num_drafts, **ints)  # every chain is k long
        self.accepted = torch.zeros((max_batch,), **ints)
        self.cuda = device.type == "cuda"
        self.earliest = None
        if self.cuda:
            from parallm.kernels.prompt_lookup import lookup_buffer  # imports triton

            self.earliest = lookup_buffer(max_batch, max_n, device)
        # Two host rows, taken in turn: a step's drafts are read when it finishes, after the
        # step behind it (whose tail writes the other row) has launched, never later. Each
        # sequence's row: its k drafts (the lookup's, then fillers), then how many the lookup
        # found (the rest are fillers, no proposal: the counters leave them out).
        self.host_drafts = torch.zeros((2, max_batch, num_drafts + 1), dtype=torch.int32,
                                       pin_memory=self.cuda)  # fmt: skip
        self.turn = 0

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

    def tail(self, argmax_rows: torch.Tensor, buffers, batch: int, block_size: int,
             scratch_slot: int) -> torch.Tensor:  # fmt: skip
        """After a verify step of ``batch`` sequences in a shape whose static buffers are
        ``buffers`` (``_VerifyInputs``): accept, append, draft, stage the next step there.
        Returns the host rows that the next drafts are being copied into, each ``k`` drafts
        then the lookup's count (valid once the step's event completes)."""
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
                          earliest=self.earliest[rows], drafts=self.drafts[rows],
                          counts=self.counts[rows])  # fmt: skip
            stage_chain_step(*args, self.drafts[rows], self.full[rows], buffers.block_tables,
                             out, block_size, scratch_slot)  # fmt: skip
        else:
            self.accepted[rows] = reference.greedy_accept_ref(
                argmax_rows[: batch * q], step_ids, self.full[rows], *args
            )
            drafts, counts = reference.prompt_lookup_ref(*args, self.num_drafts, self.min_n,
                                                          self.max_n)  # fmt: skip
            self.drafts[rows], self.counts[rows] = drafts, counts
            reference.stage_chain_step_ref(*args, self.drafts[rows], self.full[rows],
                                           buffers.block_tables, out, block_size,
                                           scratch_slot)  # fmt: skip
        self.turn ^= 1
        host = self.host_drafts[self.turn, rows]
        host[:, : self.num_drafts].copy_(self.drafts[rows], non_blocking=True)
        host[:, self.num_drafts].copy_(self.counts[rows], non_blocking=True)
        return host
