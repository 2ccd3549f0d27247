"""Graph-captured steps that carry prompt tokens, applied to the model from outside.

Why: a step with a prompt chunk in it (a new request's prefill beside the running decodes) ran
eagerly, and an eager step of Qwen3-0.6B costs about 17 ms of host time whatever its size
(RESULTS, fourteenth session). Under a serving load nearly every step carries one, so the
decoding requests advanced at that pace: TPOT 2.4x vLLM's, which captures such steps too.

One graph per padded token count ``T`` (``mixed_token_sizes``): any step of at most ``T``
tokens and ``max_seqs(T)`` sequences, of any query lengths, replays it. Graph safety: every
layer but attention works row by row over the ``T`` rows; attention takes the backend's
multi-token path with ``max_query_len = T`` fixed and the prefill kernel's tile-table launch
(``AttentionMetadata.prefill_tiles``: a grid fixed by the table's size, each tile's sequence
and index written by the host into a static buffer with the step's other inputs), in two
launches: the sequences of a few tokens (decode rows) in tiles of the kernel's smallest row
count, the others in the size's tile (``paged_prefill.split_prefill_tiles``). Tokens keep
their step order (row ``i`` is the step's token ``i``); the rows after the last real token are
padding: id 0 at position 0, storing into the scratch block that no sequence owns, in no
sequence and under no tile, so nothing reads them. Padding sequences have no tokens and no
tiles. The graph gathers the sampling rows (a static gather index) before the LM head.

Without capture (``capture=False``, any device) :meth:`MixedGraphs.run` runs the same static
buffers through an eager forward: the CPU tests check the layout that way against the eager
step, with the reference attention (which reads the host-side lengths, set per run).
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from parallm.engine.graph_inputs import GraphedSteps, InputRegion
from parallm.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext

if TYPE_CHECKING:
    from parallm.engine.step_inputs import StepInputs

# Steps up to the default token budget replay graphs: capped at 2,048, a step of a 3,500-token
# prompt beside 128 decodes ran eagerly (192 launches, one prefill launch sized for the prompt
# holding the decode rows too); replayed, Qwen3-0.6B's took 22.0 ms against 26.4 (H100, with
# the multi-row RMSNorm; RESULTS, nineteenth session). Steps of larger budgets above this stay
# eager: the graphs' capture time and memory grow with the cap.
MAX_MIXED_TOKENS = 8192
# int64 rows per token in a size's input region: ids, positions, slots, the sampling gather.
_TOKEN_ROWS = 4
# int32 rows per tile in the region: query_start_loc, seq_lens, two tile tables of two rows.
_TILE_ROWS = 6
# Sizes between two powers of two above 64 tokens: padding stays under 1/8 of a step (a
# 528-token step ran as 1,024 with powers of two alone: the 8B's mixed step took 1.6-1.9x
# vLLM's at 512 prompt tokens, RESULTS, fifteenth session).
_SIZES_PER_DOUBLING = 8


def mixed_token_sizes(max_num_batched_tokens: int, max_tokens: int = MAX_MIXED_TOKENS) -> list[int]:
    """The padded token counts to capture: 16, 32, 64, then ``_SIZES_PER_DOUBLING`` evenly
    spaced sizes a doubling, up to the step's token budget (capped at ``max_tokens``), the
    budget itself included when it falls between two."""
    top = min(max_num_batched_tokens, max_tokens)
    sizes, low = [16, 32, 64], 64
    while low < top:
        step = low // _SIZES_PER_DOUBLING
        sizes += range(low + step, 2 * low + 1, step)
        low *= 2
    sizes = [t for t in sizes if t <= top]
    if top >= 16 and top not in sizes:
        sizes.append(top)
    return sizes


class _MixedInputs:
    """The static inputs of one size: one int32 region holding the token rows (ids, positions,
    slots, the sampling rows' gather index: int64 each), then per-tile rows (query_start_loc,
    seq_lens, the two tile tables' sequence and index rows), copied in one transfer; block
    tables apart (only the columns in use move), the first rows of ``block_tables``, which
    every size shares (one replay at a time reads it)."""

    def __init__(self, layout: InputRegion, seqs: int, block_tables: torch.Tensor):
        self.region = layout.allocate(block_tables.device)
        rows = layout.tokens(self.region)
        self.input_ids, self.positions, self.slot_mapping, self.sample_rows = rows.unbind(0)
        per_tile = layout.per_seq(self.region)
        self.query_start_loc = per_tile[0, : seqs + 1]
        self.seq_lens = per_tile[1, :seqs]
        self.tiles, self.short_tiles = per_tile[2:4], per_tile[4:6]
        self.block_tables = block_tables[:seqs]


class MixedGraphs(GraphedSteps):
    """Owns the static input buffers and one captured graph per padded token count."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        max_num_seqs: int,
        tokens_per_tile: dict[int, int],
        short_tokens: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        if not sizes or min(sizes) < 2:
            raise ValueError(f"mixed graphs need token counts of at least 2, got {sizes}")
        super().__init__(model, backend, kv_caches, max_blocks_per_seq, max_seq_len,
                         scratch_block, block_size, device)  # fmt: skip
        self.sizes = sorted(set(sizes))
        self.max_num_seqs = max_num_seqs
        self.tokens_per_tile = tokens_per_tile  # size -> the prefill kernel's tile at it
        self.short_tokens = short_tokens  # queries this short get the smallest row tile
        self.captures = capture
        self.layouts = {t: self._layout(t) for t in self.sizes}
        tables = torch.zeros(self.max_seqs(self.sizes[-1]), max_blocks_per_seq,
                             dtype=torch.int32, device=device)  # fmt: skip
        self.inputs = {t: _MixedInputs(self.layouts[t], self.max_seqs(t), tables)
                       for t in self.sizes}  # fmt: skip
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # logits, hidden
        self.capture_seconds = 0.0
        self.num_replays = 0

    def max_seqs(self, tokens: int) -> int:
        """Sequences a graph of ``tokens`` rows holds (one token each at most)."""
        return min(tokens, self.max_num_seqs)

    def num_tiles(self, tokens: int) -> int:
        """Query tiles a step of ``tokens`` tokens may need in either table: its tokens cut by
        the tile, plus one partial tile a sequence (the short table: one tile a sequence)."""
        return -(-tokens // self.tokens_per_tile[tokens]) + self.max_seqs(tokens)

    def _layout(self, tokens: int) -> InputRegion:
        width = max(self.num_tiles(tokens), self.max_seqs(tokens) + 1)
        return InputRegion(_TOKEN_ROWS, tokens, _TILE_ROWS, width)

    def size_for(self, inputs: StepInputs) -> int | None:
        """The smallest captured token count that holds this step, or None (it runs eagerly):
        no draft trees, its tables within the captured width, its sequences and sampling rows
        within the size's sequences."""
        if inputs.tree_num_nodes is not None or inputs.block_tables.shape[1] > self.max_blocks:
            return None
        total, seqs = int(inputs.query_start_loc[-1]), len(inputs.seq_lens)
        i = bisect.bisect_left(self.sizes, total)
        if i == len(self.sizes):
            return None
        size = self.sizes[i]
        if seqs > self.max_seqs(size) or len(inputs.sample_indices) > self.max_seqs(size):
            return None
        return size

    def forward(
        self, tokens: int, cpu: tuple[list[int], list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work of one size: the logits (model dtype) and final hidden states of
        the sampling rows (``sample_rows``; padding entries gather row 0). ``cpu``: the host
        query starts and lengths for a backend that reads them (the reference one, uncaptured);
        captured graphs use the Triton backend, which does not."""
        buf, seqs = self.inputs[tokens], self.max_seqs(tokens)
        starts, lens = cpu or ([0] * (seqs + 1), [0] * seqs)
        meta = AttentionMetadata(
            slot_mapping=buf.slot_mapping, query_start_loc=buf.query_start_loc,
            seq_lens=buf.seq_lens, block_tables=buf.block_tables, max_query_len=tokens,
            max_seq_len=self.max_seq_len, query_start_loc_cpu=starts, seq_lens_cpu=lens,
            prefill_tiles=buf.tiles, short_tiles=buf.short_tiles,
            short_query_len=self.short_tokens,
        )  # fmt: skip
        hidden = self.model(buf.input_ids, buf.positions, ForwardContext(meta, self.kv_caches,
                                                                         self.backend))  # fmt: skip
        rows = hidden[buf.sample_rows[:seqs]]
        return self.model.compute_logits(rows), rows

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool (each
        replay's outputs are read before the next replay). Every graph copies its logits and
        hidden rows into one pair of buffers sized by the largest size: outputs kept per graph
        would hold ``max_seqs * vocab`` logits for every size at once."""
        started = time.perf_counter()
        pool, shared = None, None
        for tokens in reversed(self.sizes):
            self.stage_padding(tokens)
            for _ in range(2):  # warm up: Triton compiles outside the capture
                logits, rows = self.forward(tokens)
            if shared is None:  # the largest size holds the most sequences
                shared = (torch.empty_like(logits), torch.empty_like(rows))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            views = tuple(out[: self.max_seqs(tokens)] for out in shared)
            with torch.cuda.graph(graph, pool=pool):
                for out, computed in zip(views, self.forward(tokens), strict=True):
                    out.copy_(computed)
            self.outputs[tokens] = views
            pool = graph.pool()
            self.graphs[tokens] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started

    def stage_padding(self, tokens: int) -> None:
        """Every row of the size padding (what capture runs on)."""
        buf = self.inputs[tokens]
        head, _, _ = self._staged(tokens, _empty_step())
        buf.region.copy_(head)
        buf.block_tables.fill_(self.scratch_block)

    def run(
        self,
        inputs: StepInputs,
        tokens: int | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits and final hidden states of the step's sampling rows, in order, from the
        graph of the smallest size that holds the step (``tokens``, where the caller found
        it); None when none does. ``known``: (rows, ids) on the device, ids that replace the
        host's placeholders at those rows (tokens the last step sampled, not yet on the host).
        The outputs are the graph's own buffers: read them before the next replay."""
        tokens = tokens or self.size_for(inputs)
        if tokens is None:
            return None
        buf = self.inputs[tokens]
        head, tables, cpu = self._staged(tokens, inputs)
        buf.region.copy_(head, non_blocking=True)
        buf.block_tables[: tables.shape[0], : tables.shape[1]].copy_(tables, non_blocking=True)
        if known is not None:  # after the copy above, in stream order
            rows, ids = known
            buf.input_ids[rows] = ids
        self.num_replays += 1
        if self.captures:
            self.graphs[tokens].replay()
            logits, hidden = self.outputs[tokens]
        else:
            with torch.inference_mode():
                logits, hidden = self.forward(tokens, cpu)
        rows = len(inputs.sample_indices)
        return logits[:rows], hidden[:rows]

    def _staged(
        self, tokens: int, inputs: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[list[int], list[int]]]:
        """The size's region and the step's block tables in fresh host memory (pinned on
        CUDA: a step may be staged while the last one's copy is in flight), and the host
        query starts and lengths of the padded step (module docstring: the layout)."""
        pinned, layout = self.device.type == "cuda", self.layouts[tokens]
        seqs, total = self.max_seqs(tokens), int(inputs.query_start_loc[-1])
        batch = len(inputs.seq_lens)
        head = torch.empty(layout.words, dtype=torch.int32, pin_memory=pinned)
        words = head.numpy()
        rows = layout.tokens(words)
        rows[:] = 0
        rows[0, :total] = inputs.input_ids
        rows[1, :total] = inputs.positions
        rows[2, :total] = inputs.slot_mapping
        rows[2, total:] = self.scratch_block * self.block_size
        rows[3, : len(inputs.sample_indices)] = inputs.sample_indices
        per_tile = layout.per_seq(words)
        per_tile[:] = 0
        starts, lens = per_tile[0, : seqs + 1], per_tile[1, :seqs]
        starts[: batch + 1] = inputs.query_start_loc
        starts[batch + 1 :] = total
        lens[:batch] = inputs.seq_lens
        per_tile[2:6] = self._tiles(tokens, np.diff(inputs.query_start_loc), inputs.seq_lens,
                                    per_tile.shape[1])  # fmt: skip
        tables = torch.from_numpy(np.ascontiguousarray(inputs.block_tables, dtype=np.int32))
        if pinned:
            tables = tables.pin_memory()
        return head, tables, (starts.tolist(), lens.tolist())

    def _tiles(
        self, tokens: int, query_lens: np.ndarray, seq_lens: np.ndarray, width: int
    ) -> np.ndarray:
        """``[4, width]``: the size's tile table, then the short queries' one, each with the
        tiles that see the most keys first."""
        from parallm.kernels.paged_prefill import split_prefill_tiles  # triton: when staged

        return np.concatenate(split_prefill_tiles(query_lens, self.tokens_per_tile[tokens],
                                                  self.short_tokens, width, seq_lens))  # fmt: skip


def _empty_step() -> StepInputs:
    """A step of no sequences (every row of a size padding), for capture."""
    from parallm.engine.step_inputs import StepInputs

    empty = np.zeros(0, dtype=np.int64)
    return StepInputs(
        input_ids=empty, positions=empty, slot_mapping=empty,
        query_start_loc=np.zeros(1, dtype=np.int32), seq_lens=np.zeros(0, dtype=np.int32),
        block_tables=np.zeros((0, 1), dtype=np.int32), sample_indices=empty,
    )  # fmt: skip
