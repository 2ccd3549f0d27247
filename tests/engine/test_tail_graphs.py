"""The device drafter's tail graphs (spec/tail_graphs.py), what can run without CUDA: which
verify shape each batch size stages into, and when ``DeviceDrafts.tail`` replays a graph rather
than running eagerly. A stand-in graph that runs the eager tail into a static argmax takes the
captured one's place; the capture itself is tested in test_tail_graphs_gpu.py. The helpers
here (random state, snapshots, results) serve both."""

from __future__ import annotations

import torch

from parallm.engine.spec.device_drafts import DeviceDrafts
from parallm.engine.spec.tail_graphs import TailGraphs, tail_shapes
from parallm.engine.verify_graph import VerifyShape, _VerifyInputs

STATE = ("tokens", "lengths", "drafts", "counts", "accepted", "latest", "host_drafts")
ALPHABET = 6  # token ids of the random rows
STAGED = ("input_ids", "positions", "slot_mapping", "sample_rows", "seq_lens", "block_tables")


def random_state(drafts: DeviceDrafts, buffers, logits: torch.Tensor, batch: int,
                 block_size: int, num_blocks: int, seed: int) -> None:  # fmt: skip
    """Fresh random device state for a tail of ``batch`` sequences: tokens over a small
    alphabet (n-grams recur, so lookups find drafts), lengths with room for the step's tokens
    and the next step's positions, random logits (never all zero: the argmax varies), step
    ids whose drafts follow the argmax for a random number of rows (acceptance varies), and
    random block tables and staged rows (padding sequences' rows must come out untouched)."""
    gen = torch.Generator().manual_seed(seed)
    q, device = 1 + drafts.num_drafts, drafts.device

    def ints(high: int, shape, low: int = 0) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=gen).to(device)

    room = min(drafts.tokens.shape[1] - q, buffers.block_tables.shape[1] * block_size - 2 * q)
    drafts.tokens.copy_(ints(ALPHABET, drafts.tokens.shape))
    drafts.lengths.copy_(ints(room, drafts.lengths.shape, low=2))
    for name in ("drafts", "counts", "accepted"):
        getattr(drafts, name).copy_(ints(6, getattr(drafts, name).shape))
    values = torch.randn(tuple(logits.shape), generator=gen)
    values[:, :ALPHABET] += 4  # argmax tokens mostly in the alphabet too: the next lookup matches
    logits.copy_(values.to(device, logits.dtype))
    argmax = logits[: batch * q].float().argmax(-1).cpu()
    ids = torch.randint(0, logits.shape[1], (buffers.input_ids.numel(),), generator=gen)
    for b in range(batch):
        taken = int(torch.randint(0, q, (), generator=gen))
        ids[b * q + 1 : b * q + 1 + taken] = argmax[b * q : b * q + taken]
    buffers.input_ids.copy_(ids)
    for name in STAGED[1:]:
        target = getattr(buffers, name)
        target.copy_(ints(num_blocks, target.shape))


def snapshot(drafts: DeviceDrafts, buffers) -> dict:
    """Everything a tail reads or writes, cloned (``restore`` puts it back)."""
    saved = {name: getattr(drafts, name) for name in STATE}
    saved |= {name: getattr(buffers, name) for name in STAGED}
    saved = {name: t.clone() for name, t in saved.items() if t is not None}
    saved["turn"] = drafts.turn
    return saved


def restore(drafts: DeviceDrafts, buffers, saved: dict) -> None:
    for name, value in saved.items():
        if name == "turn":
            drafts.turn = value
        else:
            target = getattr(drafts, name) if name in STATE else getattr(buffers, name)
            target.copy_(value)


def results(drafts: DeviceDrafts, buffers, argmax: torch.Tensor, host: torch.Tensor) -> dict:
    """A tail's outputs, cloned once its copies are done."""
    if drafts.cuda:
        torch.cuda.synchronize(drafts.device)
    out = {name: t.clone() for name, t in snapshot(drafts, buffers).items() if name != "turn"}
    return out | {"argmax": argmax.clone(), "host": host.clone(), "turn": drafts.turn}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


# --- which shape, when to replay -------------------------------------------------------------

Q, BLOCK, WIDTH, VOCAB = 4, 4, 64, 50
SCRATCH_BLOCK = 30


class _StandIn:
    """A captured tail's stand-in: its replay runs the eager tail into the static argmax."""

    def __init__(self, drafts: DeviceDrafts, tails: TailGraphs, buffers, batch: int) -> None:
        self.drafts, self.tails, self.buffers, self.batch = drafts, tails, buffers, batch
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        logits = self.tails.logits[: self.batch * Q]
        argmax = self.drafts.run_tail(logits, self.buffers, self.batch, BLOCK,
                                      SCRATCH_BLOCK * BLOCK)  # fmt: skip
        self.tails.argmax[self.batch].copy_(argmax)


def _setup(sizes: list[int]):
    drafts = DeviceDrafts(max(sizes), WIDTH, Q - 1, 1, 3, torch.device("cpu"))
    columns = WIDTH // BLOCK + 1
    buffers = {s: _VerifyInputs(VerifyShape(s, Q, False), columns, drafts.device) for s in sizes}
    tails = TailGraphs(torch.zeros(max(sizes) * Q + 3, VOCAB), Q)
    return drafts, buffers, tails


def _capture(drafts: DeviceDrafts, tails: TailGraphs, buffers, batch: int) -> _StandIn:
    tails.graphs[batch] = _StandIn(drafts, tails, buffers, batch)
    tails.argmax[batch] = torch.zeros(batch * Q, dtype=torch.long)
    tails.buffers[batch] = buffers
    return tails.graphs[batch]


def _run(drafts, buffers, logits, batch):
    argmax, host = drafts.tail(logits, buffers, batch, BLOCK, SCRATCH_BLOCK * BLOCK)
    return results(drafts, buffers, argmax, host), argmax


def test_each_batch_size_stages_into_the_smallest_shape_that_holds_it():
    assert tail_shapes([1, 2, 4], 9) == {
        1: VerifyShape(1, 9, False), 2: VerifyShape(2, 9, False),
        3: VerifyShape(4, 9, False), 4: VerifyShape(4, 9, False),
    }  # fmt: skip
    assert (
        list(tail_shapes([2, 8], 4).values())
        == [VerifyShape(2, 4, False)] * 2 + [VerifyShape(8, 4, False)] * 6
    )
    assert tail_shapes([], 4) == {}


def test_a_tail_replays_its_graph_only_for_the_shared_logits_of_a_captured_size():
    drafts, buffers, tails = _setup([2, 4])
    four = buffers[4]
    graph = _capture(drafts, tails, four, 3)  # batch 3 stages into the shape of 4
    drafts.graphs = tails
    logits = tails.logits[: 3 * Q]
    random_state(drafts, four, tails.logits, 3, BLOCK, SCRATCH_BLOCK, seed=0)
    saved = snapshot(drafts, four)
    drafts.graphs = None
    want, _ = _run(drafts, four, logits, 3)
    assert want["accepted"][:3].sum() > 0 and want["counts"][:3].min() > 0  # a real test
    for padding in ("input_ids", "positions", "slot_mapping", "sample_rows"):
        assert torch.equal(want[padding][3 * Q :], saved[padding][3 * Q :]), padding
    assert torch.equal(want["seq_lens"][3:], saved["seq_lens"][3:])
    drafts.graphs = tails
    restore(drafts, four, saved)
    got, argmax = _run(drafts, four, logits, 3)
    assert graph.replays == 1 and argmax is tails.argmax[3]
    assert_same(got, want)
    # Anything else runs eagerly, to the eager tail's results: logits elsewhere (an eager
    # verify step's), other rows, other buffers, a size without a graph.
    for target, rows, batch in [(four, logits.clone(), 3), (four, tails.logits[: 2 * Q], 2),
                                (buffers[2], tails.logits[: 2 * Q], 2),
                                (four, tails.logits[Q : 4 * Q], 3)]:  # fmt: skip
        assert not tails.holds(rows, target, batch)
        before = snapshot(drafts, target)
        drafts.graphs = None
        want, _ = _run(drafts, target, rows, batch)
        restore(drafts, target, before)
        drafts.graphs = tails
        got, _ = _run(drafts, target, rows, batch)
        assert graph.replays == 1
        assert_same(got, want)


def test_reset_leaves_the_state_as_constructed():
    drafts, buffers, tails = _setup([2])
    random_state(drafts, buffers[2], tails.logits, 2, BLOCK, SCRATCH_BLOCK, seed=1)
    drafts.tail(tails.logits[: 2 * Q], buffers[2], 2, BLOCK, SCRATCH_BLOCK * BLOCK)
    drafts.reset()
    for name in ("tokens", "lengths", "drafts", "counts", "accepted"):
        assert not getattr(drafts, name).any(), name


class _StandInGraph:
    """``torch.cuda.CUDAGraph`` off CUDA: only the pool it was captured into."""

    pool = None


class _Uncaptured:
    """``torch.cuda.graph`` off CUDA: the block runs eagerly, as a capture's Python does."""

    def __init__(self, graph, pool=None) -> None:
        graph.pool = pool

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def test_capture_covers_every_batch_size_and_leaves_the_state_as_constructed(
    tiny_model_dir, monkeypatch
):
    """``capture_tails``' bookkeeping, its CUDA calls stubbed (the block it would capture runs
    eagerly here, through the kernels' twins): a graph per batch size over the right shape's
    buffers, and afterwards the device state empty and every touched shape all padding."""
    from test_device_drafts import _device_llm

    from parallm.engine.spec.tail_graphs import capture_tails
    from parallm.engine.verify_graph import _empty_step

    runner = _device_llm(str(tiny_model_dir("llama3"))).engine.runner
    drafts, graphs = runner.device_drafts, runner.verify_graphs
    largest = graphs.shapes[0]
    graphs._shared_outputs = (torch.randn(largest.num_tokens, 64), None)
    for name, stub in [("graph", _Uncaptured), ("CUDAGraph", _StandInGraph),
                       ("graph_pool_handle", lambda: "pool"), ("synchronize", lambda _: None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, stub)
    q = 1 + drafts.num_drafts
    tails = capture_tails(drafts, graphs, runner.block_size)
    assert sorted(tails.graphs) == [1, 2, 3, 4] and tails.logits is graphs.shared_logits
    for batch, size in [(1, 1), (2, 2), (3, 4), (4, 4)]:
        assert tails.buffers[batch] is graphs.inputs[VerifyShape(size, q, False)]
        assert tails.argmax[batch].shape == (batch * q,)
        assert tails.graphs[batch].pool == "pool"  # one pool for all
    for name in ("tokens", "lengths", "drafts", "counts", "accepted"):
        assert not getattr(drafts, name).any(), name
    for size in (1, 2, 4):
        shape = VerifyShape(size, q, False)
        head, _, _ = graphs._staged(shape, _empty_step(False))
        assert torch.equal(graphs.inputs[shape].region, head), shape
