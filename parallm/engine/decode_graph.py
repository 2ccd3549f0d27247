"""The graph-captured decode step, applied to the model from outside.

A decode step of a small model is a few hundred short kernels; launching them one by one from
Python costs more than running them. A captured graph launches them all at once: one graph per
batch size, replayed with padded inputs. Inputs are copied into static buffers; rows past the
real batch point at a scratch block that no sequence owns, so padding never touches live KV
entries.

Each graph ends in the greedy argmax (``parallm.kernels.argmax``), which also writes its ids
into the graph's own input ids, moves the positions, lengths and slots on by one token, and
writes the ids to pinned host memory (:class:`HostRing`): a greedy continuation of the same
batch then needs no input copy until a block table changes, and no device-to-host copy. Batch 1
runs the one-row kernel chain (``parallm.engine.one_row_step``) when the model supports it.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from parallm.engine.graph_inputs import GraphedSteps, InputRegion
from parallm.engine.one_row_step import OneRowStep, supports_one_row_step
from parallm.engine.tp_group import track_captured_collectives
from parallm.kernels.argmax import DecodeInputs, advance_inputs_ref, triton_argmax
from parallm.kernels.paged_decode import longest_first
from parallm.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext

# A step's inputs travel in one host-to-device copy (each copy costs a few microseconds of
# idle GPU around it) when the block tables at full width stay under this size; past it the
# tables go in a second copy of only the columns in use.
_ONE_COPY_MAX_BYTES = 512 * 1024


@dataclass
class HostRing:
    """Where a graph's argmax also writes its ids on the host: two rows of pinned memory
    ``ids [2, rows]`` int64 (mapped into the GPU's address space) and a device ``turn``.

    Every replay flips the turn in its first argmax kernel and writes ``ids[turn]`` in its last,
    so consecutive replays alternate rows. The host mirrors the turn (:meth:`flip` once per
    replay) and, after the replay's event, reads its row without any device-to-host copy on
    the stream. The row is rewritten two replays later, so it must be read (or cloned) first.
    """

    ids: torch.Tensor
    turn: torch.Tensor
    host_turn: int = 0

    @classmethod
    def allocate(cls, rows: int, device: torch.device) -> HostRing:
        ids = torch.zeros(2, rows, dtype=torch.long, pin_memory=device.type == "cuda")
        return cls(ids, torch.zeros(1, dtype=torch.int32, device=device))

    def flip(self) -> torch.Tensor:
        """Mirror one replay's flip; returns the row that replay writes."""
        self.host_turn ^= 1
        return self.ids[self.host_turn]

    def reset(self) -> None:
        """Back to turn 0 on both sides (after replays the host did not mirror)."""
        self.turn.zero_()
        self.host_turn = 0


class _Inputs:
    """The static inputs of one graph size, all views of one contiguous int32 region laid out
    as ids, positions, slots (int64 each), seq_lens, the order in which the rows' attention
    starts (longest first: ``paged_decode.longest_first``), then the block tables. A replay
    moves every row on by one token, which keeps that order."""

    def __init__(self, size: int, max_blocks: int, device: torch.device) -> None:
        self.size = size
        self.layout = InputRegion(3, size, 2, size, max_blocks)
        self.head_len = self.layout.head_words  # int32 words before the tables
        self.region = self.layout.allocate(device)
        tokens = self.layout.tokens(self.region)
        self.input_ids, self.positions, self.slot_mapping = tokens.unbind(0)
        self.seq_lens, self.row_order = self.layout.per_seq(self.region).unbind(0)
        self.block_tables = self.layout.tables(self.region)


class DecodeGraphs(GraphedSteps):
    """Owns the static input buffers and one captured graph per batch size."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        one_row: bool = False,
    ) -> None:
        super().__init__(model, backend, kv_caches, max_blocks_per_seq, max_seq_len,
                         scratch_block, block_size, device)  # fmt: skip
        # ``one_row``: batch 1 runs the Triton kernel chain instead of the model's forward.
        use_chain = one_row and supports_one_row_step(model, backend)
        self.one_row = OneRowStep(model, backend) if use_chain else None
        self.sizes = sorted(sizes)
        self.inputs = {size: _Inputs(size, max_blocks_per_seq, device) for size in self.sizes}
        self.host_rings = {size: HostRing.allocate(size, device) for size in self.sizes}
        self.query_start_loc = torch.arange(self.sizes[-1] + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # logits, greedy ids
        self.capture_seconds = 0.0
        self.num_carried_ids = 0  # steps whose input ids the previous replay left in place
        self.num_skipped_copies = 0  # steps whose whole input the previous replay left in place
        # Per size: the input region as the last replay leaves it (ids aside), host-predicted.
        self._expected: dict[int, np.ndarray | None] = dict.fromkeys(self.sizes)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _metadata(self, size: int) -> AttentionMetadata:
        query_start_loc = self.query_start_loc[: size + 1]
        buf = self.inputs[size]
        return self.static_metadata(buf, query_start_loc, 1, [self.max_seq_len] * size,
                                    decode_order=buf.row_order)  # fmt: skip

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            buf = self.inputs[size]
            buf.seq_lens.fill_(1)
            buf.row_order.copy_(torch.arange(size, dtype=torch.int32))
            buf.slot_mapping.fill_(self.scratch_block * self.block_size)
            buf.block_tables.fill_(self.scratch_block)
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self.forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
            track_captured_collectives(graph)  # tensor parallelism: its all-reduces
            self.outputs[size] = out
        torch.cuda.synchronize(self.device)
        self.forget_inputs()
        self.capture_seconds = time.perf_counter() - started

    def forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work of one size: logits in the model's dtype and their greedy ids,
        the inputs moved on by one token, the ids also in the size's host ring."""
        buf, meta, ring = self.inputs[size], self._metadata(size), self.host_rings[size]
        if size == 1 and self.one_row is not None:
            logits = self.one_row.logits(buf.input_ids, buf.positions, meta, self.kv_caches)
            pdl = self.one_row.pdl  # the argmax chains on after the LM head GEMV
        else:
            ctx = ForwardContext(meta, self.kv_caches, self.backend)
            hidden = self.model(buf.input_ids, buf.positions, ctx)
            logits, pdl = self.model.compute_logits(hidden), False
        advance = DecodeInputs(buf.positions, buf.seq_lens, buf.slot_mapping, buf.block_tables,
                               self.block_size)  # fmt: skip
        greedy = triton_argmax(logits, also_into=buf.input_ids, advance=advance,
                               host_ids=(ring.ids, ring.turn), pdl=pdl)  # fmt: skip
        return logits, greedy

    def forget_inputs(self) -> None:
        """Drop the predictions of what the input buffers hold, so the next step of every size
        copies its inputs: call it after replaying or writing a graph's inputs other than
        through :meth:`run` (the warm-up forwards of a capture advance them)."""
        self._expected = dict.fromkeys(self.sizes)
        for ring in self.host_rings.values():
            ring.reset()

    def replay(self, size: int) -> None:
        """Replay one graph on whatever its inputs hold (benchmarks); keeps the host ring's
        turn in step. Call :meth:`forget_inputs` before the next :meth:`run`."""
        self.host_rings[size].flip()
        self.graphs[size].replay()

    def padded_size(self, batch: int) -> int | None:
        i = bisect.bisect_left(self.sizes, batch)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        device_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replay the graph for this batch; returns the logits and greedy token ids of the
        first ``len(input_ids)`` rows, and the same ids in pinned host memory (valid once the
        replay has finished; rewritten by the replay after next).

        ``device_ids`` (already on the GPU) replaces the first ``len(device_ids)`` of
        ``input_ids`` when the previous step's sampled tokens have not reached the host yet;
        rows past them (prompts admitted into a step launched ahead: their last token) take
        the host's. When they are that replay's own greedy ids, same graph and rows, the graph
        already wrote them into its input ids (the forward's argmax does): they are neither
        copied nor staged.
        """
        batch = len(input_ids)
        if device_ids is not None and len(device_ids) > batch:
            raise ValueError(f"{len(device_ids)} device ids for a step of {batch} rows")
        size = self.padded_size(batch)
        buf = self.inputs[size]
        width = block_tables.shape[1]
        one_copy = size * self.max_blocks * 4 <= _ONE_COPY_MAX_BYTES
        carried = device_ids is not None and _same_view(device_ids, self.outputs[size][1], batch)
        # Fresh pinned staging each step: the caching host allocator keeps a buffer from reuse
        # until its copy has run, so a step may be staged while the previous one is in flight.
        words = buf.region.numel() if one_copy else buf.head_len
        host = torch.empty(words, dtype=torch.int32, pin_memory=True)
        tokens = buf.layout.tokens(host)
        tokens[0, :batch] = torch.from_numpy(input_ids)
        tokens[1, :batch] = torch.from_numpy(positions)
        tokens[2, :batch] = torch.from_numpy(slot_mapping)
        # Padding rows: one token in the scratch block. Kernels read a row's table only up to
        # its length, so table columns past `width` may hold stale ids.
        tokens[0:2, batch:] = 0
        tokens[2, batch:] = self.scratch_block * self.block_size
        lens, order = buf.layout.per_seq(host).unbind(0)
        lens[:batch] = torch.from_numpy(seq_lens)
        lens[batch:] = 1
        order.copy_(torch.from_numpy(longest_first(lens.numpy())))
        if one_copy:
            tables = buf.layout.tables(host)[:, :width]
            # Every word defined, so the region compares whole with the predicted one.
            buf.layout.tables(host)[:, width:] = self.scratch_block
        else:
            tables = torch.empty((size, width), dtype=torch.int32, pin_memory=True)
        tables[:batch] = torch.from_numpy(block_tables)
        tables[batch:] = self.scratch_block
        skip = 2 * size if carried else 0  # the ids are the region's first 2 * size words
        staged = host.numpy()
        expected = self._expected[size]
        if carried and expected is not None and np.array_equal(staged[skip:], expected[skip:]):
            self.num_skipped_copies += 1  # the last replay left exactly these inputs
        else:
            buf.region[skip:words].copy_(host[skip:], non_blocking=True)
            if not one_copy:  # long contexts: only the columns in use
                buf.block_tables[:, :width].copy_(tables, non_blocking=True)
        self._expected[size] = self._advanced(staged, size) if one_copy else None
        if carried:
            self.num_carried_ids += 1
        elif device_ids is not None:  # after the region's copy, which staged every row's id
            buf.input_ids[: len(device_ids)].copy_(device_ids)
        host_ids = self.host_rings[size].flip()[:batch]
        self.graphs[size].replay()
        logits, greedy = self.outputs[size]
        return logits[:batch], greedy[:batch], host_ids

    def _advanced(self, staged: np.ndarray, size: int) -> np.ndarray:
        """The region ``staged`` as the replay leaves it: every row one token on."""
        region, layout = staged.copy(), self.inputs[size].layout
        tokens = layout.tokens(region)
        advance_inputs_ref(tokens[1], layout.per_seq(region)[0], tokens[2],
                           layout.tables(region), self.block_size)  # fmt: skip
        return region


def _same_view(ids: torch.Tensor, greedy: torch.Tensor, batch: int) -> bool:
    """``ids`` is ``greedy[:batch]``: the graph's own output, rows unchanged."""
    return ids.data_ptr() == greedy.data_ptr() and ids.shape == (batch,) and ids.stride() == (1,)
