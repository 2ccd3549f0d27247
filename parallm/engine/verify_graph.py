"""Graph-captured verify steps of speculative decoding, applied to the model from outside.

A verify step computes, for every drafted sequence, its last known token and its drafts (a
chain, or a draft tree's nodes): ``q = 1 + drafts`` tokens a sequence, and logits at every one
of them. Launched eagerly on a large model it costs several graph-replayed decode steps, which
eats what accepted drafts gain. As vLLM captures its uniform-decode batches with
``num_speculative_tokens + 1`` query tokens per request, one graph is captured per
:class:`VerifyShape` (padded batch size, tokens per sequence, chains or trees) and replayed
for a step whose sequences all decode (one known token, then drafts, every row sampled):
chains shorter than the longest one are padded up to its ``q`` tokens, draft trees must all
have ``q`` tokens; any other step (prompt chunks, mixed tree sizes) runs eagerly.

Graph safety: the attention takes the backend's multi-token path (rotary and KV store, then
the prefill kernel, with the tree mask when the step has draft trees), which reads only device
tensors and the fixed ``max_query_len = q``. Inputs are copied into static buffers. Padding
tokens (after a short chain's real ones, and the ``q`` tokens of each padding sequence) store
their keys and values in the scratch block that no sequence owns, so padding never touches
live KV entries; a padded chain's length counts its padding tokens, which puts its real
tokens at their positions and leaves the padding keys after them, out of their causal view.
The graph gathers the real rows' hidden states (a gather index in the inputs) before the LM
head, so its outputs are the step's sampling rows in order, as the eager step's are.

Without capture (``capture=False``, any device) :meth:`VerifyGraphs.run` runs the same static
buffers through an eager forward: the CPU tests check the layout that way against the eager
verify step, with the reference attention (which reads the host-side lengths, set per run).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from parallm.engine.graph_inputs import GraphedSteps, InputRegion
from parallm.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext

if TYPE_CHECKING:
    from parallm.engine.spec.drafting import Drafter
    from parallm.engine.step_inputs import StepInputs

# Verify graphs stop at this batch size unless ``disable_by_batch_size`` sets the limit:
# speculation pays at small batches, and each shape's logits take q * batch * vocab elements.
DEFAULT_MAX_VERIFY_BATCH = 64
# int64 rows per token in a shape's input region: ids, positions, slots, tree bitmasks and the
# gather index of the sampling rows.
_TOKEN_ROWS = 5


@dataclass(frozen=True, order=True)
class VerifyShape:
    """What one verify graph computes: ``batch`` sequences (the real ones padded up to it) of
    ``tokens_per_seq`` tokens each, with the tree mask (``tree``) or causal chains."""

    batch: int
    tokens_per_seq: int
    tree: bool

    @property
    def num_tokens(self) -> int:
        return self.batch * self.tokens_per_seq

    @property
    def layout(self) -> InputRegion:
        """The shape's input region (``_VerifyInputs.region``): the token rows, then
        seq_lens and the tree node counts; no block tables."""
        return InputRegion(_TOKEN_ROWS, self.num_tokens, 2, self.batch)


def verify_shapes(
    batch_sizes: Iterable[int],
    chain_drafts: int | None = None,
    tree_nodes: int | None = None,
    max_batch: int = DEFAULT_MAX_VERIFY_BATCH,
    max_tokens: int | None = None,
) -> list[VerifyShape]:
    """The shapes to capture: each batch size up to ``max_batch`` (and ``batch * q`` up to
    ``max_tokens``) with every chain length 1..``chain_drafts`` (a drafter may propose fewer
    than its maximum), and with a full tree of ``tree_nodes`` nodes (Medusa's fixed tree; a
    cut tree runs eagerly). Largest first, the order in which capture shares memory."""
    per_seq = [(1 + d, False) for d in range(1, (chain_drafts or 0) + 1)]
    if tree_nodes:
        per_seq.append((1 + tree_nodes, True))
    shapes = {
        VerifyShape(size, q, tree)
        for size in batch_sizes
        for q, tree in per_seq
        if size <= max_batch and (max_tokens is None or size * q <= max_tokens)
    }
    return sorted(shapes, key=lambda s: (s.num_tokens, s), reverse=True)


def drafter_shapes(
    drafter: Drafter, batch_sizes: Iterable[int], max_tokens: int | None = None
) -> list[VerifyShape]:
    """``verify_shapes`` for what ``drafter`` proposes: Medusa its tree (a chain when its
    paths are one chain), every other method chains of up to ``num_speculative_tokens``;
    batch sizes up to the smallest that holds ``disable_by_batch_size`` sequences (a drafted
    batch pads up to a captured size; above the limit nothing is drafted), or up to
    ``DEFAULT_MAX_VERIFY_BATCH``."""
    spec = drafter.config
    batch_sizes = list(batch_sizes)  # read twice below
    max_batch = _covering_size(batch_sizes, spec.disable_by_batch_size)
    paths = getattr(drafter.model, "paths", None) if spec.method == "medusa" else None
    if paths is None:
        return verify_shapes(batch_sizes, spec.num_speculative_tokens, None, max_batch, max_tokens)
    if len(paths) == max(map(len, paths)):  # one node a level: the top-1 chain
        return verify_shapes(batch_sizes, len(paths), None, max_batch, max_tokens)
    return verify_shapes(batch_sizes, None, len(paths), max_batch, max_tokens)


def _covering_size(batch_sizes: list[int], limit: int | None) -> int:
    """The largest verify batch to capture: the smallest captured size of at least ``limit``
    (the largest size when none holds it); ``DEFAULT_MAX_VERIFY_BATCH`` without a limit."""
    if limit is None:
        return DEFAULT_MAX_VERIFY_BATCH
    return min((s for s in batch_sizes if s >= limit), default=max(batch_sizes, default=limit))


def verify_tokens_per_seq(inputs: StepInputs) -> int | None:
    """``q >= 2``, the most tokens a sequence of the step computes, when the step is a verify
    step: every sequence samples at each of its tokens (its last known token and its drafts,
    if any), and with draft trees every sequence computes ``q``; None for any other step."""
    query_lens = np.diff(inputs.query_start_loc)
    total = int(inputs.query_start_loc[-1])
    q = int(query_lens.max()) if len(query_lens) else 0
    if q < 2 or len(inputs.sample_indices) != total:
        return None
    if inputs.tree_num_nodes is not None and not (query_lens == q).all():
        return None
    return q


class _VerifyInputs:
    """The static inputs of one shape: one int32 region holding the token rows (ids,
    positions, slots, tree bitmasks, the sampling rows' gather index: int64 each) then the
    per-sequence rows (seq_lens, tree node counts), copied in one transfer; block tables apart
    (only the columns in use move)."""

    def __init__(self, shape: VerifyShape, max_blocks: int, device: torch.device) -> None:
        layout = shape.layout
        self.region = layout.allocate(device)
        rows = layout.tokens(self.region)
        self.input_ids, self.positions, self.slot_mapping, self.tree_visible = rows[:4].unbind(0)
        self.sample_rows = rows[4]
        self.seq_lens, self.tree_num_nodes = layout.per_seq(self.region).unbind(0)
        self.block_tables = torch.zeros(shape.batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(
            0, shape.num_tokens + 1, shape.tokens_per_seq, dtype=torch.int32, device=device
        )


class VerifyGraphs(GraphedSteps):
    """Owns the static input buffers and one captured graph per :class:`VerifyShape`."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        shapes: list[VerifyShape],
        max_blocks_per_seq: int,
        max_seq_len: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        if not shapes:
            raise ValueError("verify graphs need at least one shape")
        super().__init__(model, backend, kv_caches, max_blocks_per_seq, max_seq_len,
                         scratch_block, block_size, device)  # fmt: skip
        self.shapes = sorted(shapes, key=lambda s: (s.num_tokens, s), reverse=True)
        self.captures = capture
        # Padding tokens sit past a chain's end: up to q - 1 positions more than any sequence.
        most_tokens = max(s.tokens_per_seq for s in self.shapes)
        columns = max_blocks_per_seq + -(-most_tokens // block_size)
        self.inputs = {s: _VerifyInputs(s, columns, device) for s in self.shapes}
        # (tokens per sequence, tree) -> the captured batch sizes, ascending.
        self.sizes: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for s in sorted(self.shapes):
            self.sizes[(s.tokens_per_seq, s.tree)].append(s.batch)
        self.graphs: dict[VerifyShape, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[VerifyShape, tuple[torch.Tensor, torch.Tensor]] = {}  # logits, hidden
        self._shared_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.capture_seconds = 0.0
        self.num_replays = 0

    @property
    def shared_logits(self) -> torch.Tensor | None:
        """The buffer every graph copies its logits into (rows of the largest shape; ``run``
        returns a view of its first rows), or None before capture."""
        return None if self._shared_outputs is None else self._shared_outputs[0]

    def shape_for(self, inputs: StepInputs) -> VerifyShape | None:
        """The smallest shape that holds this step, or None (the step runs eagerly)."""
        q = verify_tokens_per_seq(inputs)
        if q is None or inputs.block_tables.shape[1] > self.max_blocks:
            return None
        sizes = self.sizes.get((q, inputs.tree_num_nodes is not None), [])
        i = bisect.bisect_left(sizes, len(inputs.seq_lens))
        return (
            VerifyShape(sizes[i], q, inputs.tree_num_nodes is not None) if i < len(sizes) else None
        )

    def _metadata(self, shape: VerifyShape, seq_lens_cpu: list[int]) -> AttentionMetadata:
        buf = self.inputs[shape]
        trees = {}
        if shape.tree:
            trees = dict(tree_num_nodes=buf.tree_num_nodes, tree_visible=buf.tree_visible)
        return self.static_metadata(buf, buf.query_start_loc, shape.tokens_per_seq, seq_lens_cpu,
                                    **trees)  # fmt: skip

    def forward(
        self, shape: VerifyShape, seq_lens_cpu: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured work of one shape: the final hidden states of the sampling rows (the
        real tokens first, in the step's order; ``sample_rows``) and their logits (model
        dtype). ``seq_lens_cpu``: the host lengths for a backend that reads them (the
        reference one, uncaptured); captured graphs use the Triton backend, which does not."""
        buf = self.inputs[shape]
        lens = seq_lens_cpu or [self.max_seq_len] * shape.batch
        ctx = ForwardContext(self._metadata(shape, lens), self.kv_caches, self.backend)
        rows = self.model(buf.input_ids, buf.positions, ctx)[buf.sample_rows]
        return self.model.compute_logits(rows), rows

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape, largest first so smaller graphs reuse its memory pool (each
        replay's outputs are read before the next replay). A pool of their own: decode graphs'
        outputs may feed the next decode step. Every graph copies its logits and hidden rows
        into one pair of buffers sized by the largest shape: outputs kept per graph would hold
        ``q * batch * vocab`` logits for every shape at once."""
        started = time.perf_counter()
        pool = None
        for shape in self.shapes:
            graph = self._capture_one(shape, pool)
            pool = graph.pool()
            self.graphs[shape] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started

    def _capture_one(self, shape: VerifyShape, pool) -> torch.cuda.CUDAGraph:
        """One shape's graph (its forward's own outputs die here, back to the pool)."""
        self.stage_padding(shape)
        for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
            logits, rows = self.forward(shape)
        if self._shared_outputs is None:  # the first (largest) shape sizes them
            self._shared_outputs = (torch.empty_like(logits), torch.empty_like(rows))
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        shared = [out[: shape.num_tokens] for out in self._shared_outputs]
        with torch.cuda.graph(graph, pool=pool):
            for out, computed in zip(shared, self.forward(shape), strict=True):
                out.copy_(computed)
        self.outputs[shape] = tuple(shared)
        return graph

    def stage_padding(self, shape: VerifyShape) -> None:
        """Every sequence of the shape a padding one (what capture runs on)."""
        buf = self.inputs[shape]
        head, _, _ = self._staged(shape, _empty_step(shape.tree))
        buf.region.copy_(head)
        buf.block_tables.fill_(self.scratch_block)

    def run(
        self,
        inputs: StepInputs,
        known: torch.Tensor | None = None,
        staged: bool = False,
        shape: VerifyShape | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits and final hidden states of the step's tokens (rows in the step's order,
        every one a sampling row) from the graph of the smallest shape that holds the step;
        None when none does. The outputs are the graph's own buffers: read them before the
        next replay. ``known``: each sequence's first input on the device, in place of the
        host's placeholders (a step launched before the last one's tokens reached the host);
        ``staged``: every input but the block tables is on the device already (the device
        drafter's tail staged it; the host's are placeholders); ``shape``: ``shape_for(inputs)``
        where the caller found it already."""
        shape = shape or self.shape_for(inputs)
        if shape is None:
            return None
        buf = self.inputs[shape]
        if staged:  # the last step's tail wrote the region (spec/device_drafts.py)
            tables = self._tables(shape, inputs)
            lens = None if self.captures else buf.seq_lens.tolist()  # the real ones
        else:
            head, tables, lens = self._staged(shape, inputs)
            buf.region.copy_(head, non_blocking=True)
        buf.block_tables[:, : tables.shape[1]].copy_(tables, non_blocking=True)
        if known is not None:  # sequence b's first token sits at row b * q
            q = shape.tokens_per_seq
            buf.input_ids[: len(known) * q : q].copy_(known)
        self.num_replays += 1
        if self.captures:
            self.graphs[shape].replay()
            logits, hidden = self.outputs[shape]
        else:
            with torch.inference_mode():
                logits, hidden = self.forward(shape, lens)
        tokens = int(inputs.query_start_loc[-1])
        return logits[:tokens], hidden[:tokens]

    def _staged(
        self, shape: VerifyShape, inputs: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The shape's region, its block tables (columns in use) and its sequence lengths for
        ``inputs``, in fresh host memory (pinned on CUDA: a step may be staged while the last
        one's copy is in flight). Sequence ``b``'s tokens go to rows ``b * q ..``; padding
        tokens (the rest of a short chain's rows, and every row of a padding sequence) have id
        0 at position 0, store into the scratch block's first slot, and are no tree nodes; a
        padding sequence is ``q`` tokens long over a table of scratch blocks."""
        pinned, layout = self.device.type == "cuda", shape.layout
        batch, q = len(inputs.seq_lens), shape.tokens_per_seq
        total = int(inputs.query_start_loc[-1])
        head = torch.empty(layout.words, dtype=torch.int32, pin_memory=pinned)
        words = head.numpy()
        rows = layout.tokens(words)
        rows[:] = 0
        rows[2] = self.scratch_block * self.block_size
        query_lens = np.diff(inputs.query_start_loc)
        dest = np.arange(total) + np.repeat(np.arange(batch) * q - inputs.query_start_loc[:-1],
                                            query_lens)  # fmt: skip
        rows[0, dest] = inputs.input_ids
        rows[1, dest] = inputs.positions
        rows[2, dest] = inputs.slot_mapping
        rows[4, :total] = dest
        lens, nodes = layout.per_seq(words)
        lens[:batch] = inputs.seq_lens + (q - query_lens)  # the padding tokens count
        lens[batch:] = q
        nodes[:] = 0
        if inputs.tree_visible is not None:
            rows[3, dest] = inputs.tree_visible
            nodes[:batch] = inputs.tree_num_nodes
        return head, self._tables(shape, inputs), lens.tolist()

    def _tables(self, shape: VerifyShape, inputs: StepInputs) -> torch.Tensor:
        """The shape's block tables for ``inputs`` (columns in use), padding sequences' all
        scratch blocks, in fresh host memory (pinned on CUDA)."""
        batch, width = inputs.block_tables.shape
        pinned = self.device.type == "cuda"
        tables = torch.empty((shape.batch, width), dtype=torch.int32, pin_memory=pinned)
        tables[:batch] = torch.from_numpy(inputs.block_tables)
        tables[batch:] = self.scratch_block
        return tables


def _empty_step(tree: bool) -> StepInputs:
    """A step of no sequences (every row of a shape padding), for capture."""
    from parallm.engine.step_inputs import StepInputs

    empty = np.zeros(0, dtype=np.int64)
    return StepInputs(
        input_ids=empty, positions=empty, slot_mapping=empty,
        query_start_loc=np.zeros(1, dtype=np.int32), seq_lens=np.zeros(0, dtype=np.int32),
        block_tables=np.zeros((0, 1), dtype=np.int32), sample_indices=empty,
        tree_num_nodes=np.zeros(0, dtype=np.int32) if tree else None,
        tree_visible=empty if tree else None,
    )  # fmt: skip
