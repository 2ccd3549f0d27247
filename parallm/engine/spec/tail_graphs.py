"""The device drafter's tail captured in CUDA graphs, one per live batch size.

Why: run eagerly, the tail (``DeviceDrafts.run_tail``: the argmax, acceptance, the lookup's two
kernels, the next step's staging) is several Triton launches of tens of microseconds of Python
each; on an H100 at batch 1 they cost the host more than the verify graph's own replay
(docs/DEVICE_DRAFTER.md). Captured, they are one replay.

The graph for ``b`` sequences (every ``b`` from 1 to the largest captured shape of full chains,
``q = k + 1`` tokens a sequence) reads the logits from rows ``0 .. b * q - 1`` of the verify
graphs' shared output buffer (every verify graph copies its logits there and
``VerifyGraphs.run`` returns a view of it) and stages into the buffers of the smallest captured
chain shape of at least ``b`` sequences (the one ``VerifyGraphs.shape_for`` picks for such a
step), on rows ``0 .. b - 1`` only, as the eager tail does. Its argmax is a static tensor that
the next tail replay may overwrite (the graphs share one memory pool): it is read before that
(the runner copies it to the host right after the step). The drafts' copy to the host stays
outside the graphs: its host row alternates from step to step.

A step replays only when its logits are that buffer's rows (same address, ``b * q`` rows) and
its buffers are the graph's; any other step (a verify step run eagerly) runs the tail eagerly.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING

import torch

from parallm.engine.verify_graph import VerifyShape

if TYPE_CHECKING:
    from parallm.engine.spec.device_drafts import DeviceDrafts
    from parallm.engine.verify_graph import VerifyGraphs


def tail_shapes(sizes: list[int], q: int) -> dict[int, VerifyShape]:
    """Each live batch size ``1 .. max(sizes)`` -> the smallest chain shape of ``q`` tokens a
    sequence that holds it (``sizes``: the captured batch sizes of such shapes, ascending)."""
    return {
        b: VerifyShape(sizes[bisect.bisect_left(sizes, b)], q, False)
        for b in range(1, max(sizes, default=0) + 1)
    }


class TailGraphs:
    """The captured tails (``capture_tails``) and when a step may replay one."""

    def __init__(self, logits: torch.Tensor, q: int) -> None:
        self.logits = logits  # the verify graphs' shared logits buffer, which every graph reads
        self.q = q
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Each graph's argmax output, kept alive so that the pool never hands its memory to
        # another allocation of a later capture.
        self.argmax: dict[int, torch.Tensor] = {}
        self.buffers: dict[int, object] = {}  # the ``_VerifyInputs`` each graph stages into
        self.capture_seconds = 0.0
        self.num_replays = 0

    def holds(self, logits: torch.Tensor, buffers, batch: int) -> bool:
        """Whether the graph for ``batch`` computes this tail: it reads exactly these logits
        (the shared buffer's first ``batch * q`` rows) and stages into ``buffers``."""
        return (
            batch in self.graphs
            and buffers is self.buffers[batch]
            and logits.data_ptr() == self.logits.data_ptr()
            and tuple(logits.shape) == (batch * self.q, self.logits.shape[1])
        )

    def replay(self, batch: int) -> torch.Tensor:
        """Run the tail of ``batch`` sequences; its argmax rows (the graph's static output)."""
        self.graphs[batch].replay()
        self.num_replays += 1
        return self.argmax[batch]


@torch.inference_mode()
def capture_tails(drafts: DeviceDrafts, graphs: VerifyGraphs, block_size: int) -> TailGraphs:
    """Capture ``drafts``' tail for every live batch size over ``graphs`` (captured, CUDA).
    Leaves ``drafts``' state as constructed and the touched shapes' buffers all padding, as
    they were after the verify graphs' capture: the first real step sees what it would have
    seen without these graphs."""
    q = 1 + drafts.num_drafts
    shapes = tail_shapes(graphs.sizes.get((q, False), []), q)
    tails = TailGraphs(graphs.shared_logits, q)
    scratch_slot = graphs.scratch_block * block_size
    started = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()  # one pool for every tail graph
    for batch in sorted(shapes, reverse=True):  # largest first: smaller ones reuse its memory
        buffers = graphs.inputs[shapes[batch]]
        tails.graphs[batch], tails.argmax[batch] = _capture_one(
            drafts, tails.logits[: batch * q], buffers, batch, block_size, scratch_slot, pool
        )
        tails.buffers[batch] = buffers
    drafts.reset()
    for shape in sorted(set(shapes.values())):
        graphs.stage_padding(shape)  # the warm-ups staged rows of real-looking steps
    torch.cuda.synchronize(drafts.device)
    tails.capture_seconds = time.perf_counter() - started
    return tails


def _capture_one(
    drafts: DeviceDrafts, logits: torch.Tensor, buffers, batch: int, block_size: int,
    scratch_slot: int, pool,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:  # fmt: skip
    """One batch size's graph and its static argmax. The warm-up (Triton compiles outside the
    capture) runs on whatever the logits and step ids hold, but from a reset state: every
    length 0, so it appends at most ``q`` tokens and stages positions below ``2 * q``, inside
    the token rows and the shape's block tables (all scratch blocks since the verify
    capture), whose columns cover ``max_model_len + q`` positions."""
    drafts.reset()
    drafts.run_tail(logits, buffers, batch, block_size, scratch_slot)
    torch.cuda.synchronize(drafts.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        argmax = drafts.run_tail(logits, buffers, batch, block_size, scratch_slot)
    return graph, argmax
