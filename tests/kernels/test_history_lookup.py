"""Drafts from the ring of earlier requests on the device against their twins:
``history_lookup_ref`` and the host drafter's ``TokenHistory.lookup``, on random rings that
wrapped (and fresh ones that did not), rings longer than one program's chunk, and hand cases:
a separator stops a draft, the newest occurrence wins (across a wrap too), the longest n wins,
rows with drafts of their own are left alone.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.engine.spec.history import SEPARATOR, TokenHistory  # noqa: E402
from parallm.kernels import history_lookup as kernels  # noqa: E402
from parallm.kernels.history_lookup import history_lookup  # noqa: E402
from parallm.kernels.prompt_lookup import lookup_buffer  # noqa: E402
from parallm.kernels.reference import history_lookup_ref  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(kernels._ring_match_kernel)

# (num_tokens, min_n, max_n): the engine's range (2..8) and narrower ones.
SETTINGS = [(4, 2, 8), (8, 2, 3), (3, 3, 5), (1, 1, 2)]
OWN = 99  # the token of a row's own drafts: must survive


def _ring(capacity: int, vocab: int, seed: int, wrap: bool, base: int = 0) -> TokenHistory:
    """Random sequences added until the ring wrapped and a few more (``wrap``), else until
    it is about half full; after a random base (a datastore) of ``base`` tokens."""
    rng = random.Random(seed)
    laid = [rng.choice([*range(vocab), SEPARATOR]) for _ in range(base)]
    h = TokenHistory(capacity, laid if base else None)
    while True:
        seq = [rng.randrange(vocab) for _ in range(rng.choice([0, 1, 3, 9, 30, 80]))]
        if not wrap and h.fill + len(seq) + 1 > h.start + capacity // 2:
            return h
        h.add(seq)
        if wrap and h.wrapped and rng.random() < 0.1:
            return h


def _rows(h: TokenHistory, rows: int, width: int, vocab: int, seed: int):
    """Random rows (some ending in a slice of the ring, so long matches occur), lengths from 0
    to ``width``, and the prompt lookup's output: every third row has drafts of its own."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, width), generator=g, dtype=torch.int32)
    lengths = torch.randint(0, width + 1, (rows,), generator=g, dtype=torch.int32)
    lengths[0] = width
    ring = h.ring[: max(h.used, 1)]
    for b in range(1, rows, 2):  # a ring slice as the row's end (separators made tokens)
        at = int(torch.randint(0, len(ring), (1,), generator=g))
        piece = ring[at : at + int(lengths[b])].clamp(min=0)
        tokens[b, int(lengths[b]) - len(piece) : int(lengths[b])] = piece
    counts = torch.zeros((rows,), dtype=torch.int32)
    drafts = torch.zeros((rows, 8), dtype=torch.int32)
    counts[2::3] = 2
    drafts[2::3, :2] = OWN
    return tokens, lengths, drafts, counts


def _host(h, tokens, lengths, drafts, counts, k, lo, hi) -> list[list[int]]:
    return [
        drafts[b, : int(c)].tolist() if int(c) else h.lookup(tokens[b, :n].tolist(), k, lo, hi)
        for b, (n, c) in enumerate(zip(lengths.tolist(), counts, strict=True))
    ]


def _as_lists(drafts: torch.Tensor, counts: torch.Tensor) -> list[list[int]]:
    return [drafts[b, : int(c)].tolist() for b, c in enumerate(counts.cpu())]


def _run(fn, h, tokens, lengths, drafts, counts, k, lo, hi, device="cpu", searched=False):
    # Copies of the ring and its state, not ``to_device``: the twin and the kernel read the
    # same ring on two devices, and a TokenHistory keeps one device copy. ``searched``: the
    # kernel searches the base through its index instead of scanning it.
    ring = h.ring.to(device, copy=True)
    state = torch.tensor([h.fill, h.used, h.start], dtype=torch.int32, device=device)
    d, c = drafts[:, :k].clone().to(device), counts.clone().to(device)
    index = {"index": h.index.to_device(device)} if searched else {}
    fn(tokens.to(device), lengths.to(device), ring, state, d, c, k, lo, hi, **index)
    return d.cpu(), c.cpu()


def _check(h: TokenHistory, rows: int, width: int, vocab: int, seed: int, device: str) -> None:
    tokens, lengths, drafts, counts = _rows(h, rows, width, vocab, seed)
    for k, lo, hi in SETTINGS:
        want = _host(h, tokens, lengths, drafts[:, :k], counts, k, lo, hi)
        ref = _run(history_lookup_ref, h, tokens, lengths, drafts, counts, k, lo, hi)
        assert _as_lists(*ref) == want, (k, lo, hi)
        for searched in (False, True) if h.index is not None else (False,):
            got = _run(history_lookup, h, tokens, lengths, drafts, counts, k, lo, hi, device,
                       searched)  # fmt: skip
            assert torch.equal(got[1], ref[1]), (k, lo, hi, searched)
            assert torch.equal(got[0], ref[0]), (k, lo, hi, searched)
    assert any(len(w) and not int(c) for w, c in zip(want, counts, strict=True))  # ring drafts


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@pytest.mark.parametrize(
    ("vocab", "seed", "wrap", "base"),
    [(3, 0, True, 0), (6, 1, True, 0), (4, 2, False, 0), (4, 3, True, 200), (5, 4, False, 90)],
)
def test_reference_is_the_host_lookup(vocab, seed, wrap, base):
    _check_ref(_ring(300, vocab, seed, wrap, base), vocab, seed)


def _check_ref(h: TokenHistory, vocab: int, seed: int) -> None:
    tokens, lengths, drafts, counts = _rows(h, 9, 24, vocab, seed)
    for k, lo, hi in SETTINGS:
        want = _host(h, tokens, lengths, drafts[:, :k], counts, k, lo, hi)
        d, c = _run(history_lookup_ref, h, tokens, lengths, drafts, counts, k, lo, hi)
        assert _as_lists(d, c) == want
        assert all(d[b, int(n) :].eq(0).all() for b, n in enumerate(c))


@interpreter_test
@pytest.mark.parametrize(
    ("capacity", "vocab", "wrap", "base"),
    [(40, 3, True, 0), (700, 4, True, 0), (1500, 5, True, 0), (900, 3, False, 0),
     (300, 4, True, 700), (60, 3, False, 600)],
)  # fmt: skip
def test_matches_the_twin_and_host_lookup_interpreter(capacity, vocab, wrap, base):
    """Rings of up to three programs' chunks: the newest match may lie in any of them; with a
    base (a datastore) before the ring, which ranks oldest though it lies lowest."""
    h = _ring(capacity, vocab, seed=capacity, wrap=wrap, base=base)
    _check(h, rows=6, width=20, vocab=vocab, seed=capacity, device="cpu")


def _hand_ring() -> TokenHistory:
    h = TokenHistory(24)
    h.add([1, 2, 3, 4, 5])  # 0..5
    h.add([7, 1, 2, 8, 9])  # 6..11
    h.add([6, 6, 6, 6, 6, 6, 6, 6])  # 12..20
    h.add([3, 1, 2, 5])  # 21..25 does not fit: 0..4, over [1, 2, 3, 4, 5]
    assert (h.fill, h.used) == (5, 21)
    return h


@interpreter_test
def test_hand_cases_interpreter():
    h = _hand_ring()
    rows = [
        [0, 1, 2],  # "1 2": newest in the newer lap (position 1, below the older lap's 7)
        [7, 1, 2],  # "7 1 2" only in the older lap: the longest n wins over the newer "1 2"
        [0, 2, 5],  # "2 5": its sequence ends there, nothing follows
        [6, 6],  # a run of 6: its newest occurrence is followed by one 6, then a separator
        [8, 9],  # ends its sequence: no draft
        [1, 2],  # a row with drafts of its own: untouched
    ]
    tokens = torch.zeros((len(rows), 4), dtype=torch.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    drafts = torch.zeros((len(rows), 4), dtype=torch.int32)
    counts = torch.zeros((len(rows),), dtype=torch.int32)
    drafts[5], counts[5] = torch.tensor([OWN, OWN, OWN, 0]), 3
    want = [[5], [8, 9], [], [6], [], [OWN] * 3]
    for fn in (history_lookup_ref, history_lookup):
        got = _as_lists(*_run(fn, h, tokens, lengths, drafts, counts, 4, 2, 8))
        assert got == want, fn.__name__
    assert [h.lookup(r, 4, 2, 8) for r in rows[:5]] == want[:5]


@interpreter_test
def test_a_base_ranks_below_both_laps_interpreter():
    """The base (a datastore) lies at the lowest positions but is older than both laps: a
    match there loses to any lap's, and drafts only where no lap has one."""
    h = TokenHistory(14, base=[1, 2, 4, 4, SEPARATOR, 3, 3, 7])  # 0..8, the ring 9..22
    h.add([6, 6, 6, 6])  # 9..13
    h.add([5, 1, 2, 9])  # 14..18
    h.add([8, 3, 3, 3])  # 19..23 does not fit: 9..13, at the ring's start, over the 6s
    assert (h.start, h.fill, h.used) == (9, 14, 19)
    rows = [[0, 1, 2], [0, 3, 3], [0, 2, 4], [6, 6]]
    tokens = torch.tensor([[*r, 0][:3] for r in rows], dtype=torch.int32)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    drafts = torch.zeros((len(rows), 4), dtype=torch.int32)
    counts = torch.zeros((len(rows),), dtype=torch.int32)
    # "1 2": the older lap's (position 16) over the base's (1); "3 3": the newer lap's over
    # the base's; "2 4": the base's alone; "6 6": overwritten, found nowhere.
    want = [[9], [3], [4], []]
    for fn in (history_lookup_ref, history_lookup):
        got = _as_lists(*_run(fn, h, tokens, lengths, drafts, counts, 4, 2, 8))
        assert got == want, fn.__name__
    searched = _run(history_lookup, h, tokens, lengths, drafts, counts, 4, 2, 8, searched=True)
    assert _as_lists(*searched) == want
    assert [h.lookup(r, 4, 2, 8) for r in rows] == want


@interpreter_test
@pytest.mark.parametrize("base", [0, 300])
def test_buffers_are_written_in_place_and_left_clean_interpreter(base):
    """A captured graph calls it again and again on its own buffers, the ring changing in
    place between calls: ``newest`` is back to "no match" after each call."""
    h = _ring(600, 3, seed=4, wrap=True, base=base)
    h.to_device("cpu")
    newest = lookup_buffer(5, 8, "cpu")
    blank = newest.clone()
    rng = random.Random(9)
    for seed in (5, 6, 7):
        tokens, lengths, drafts, counts = _rows(h, 5, 16, 3, seed)
        want = history_lookup_ref(tokens, lengths, h.device_ring, h.device_state,
                                  drafts[:, :4].clone(), counts.clone(), 4, 2, 8)  # fmt: skip
        d, c = drafts[:, :4].contiguous(), counts.clone()
        got = history_lookup(tokens, lengths, h.device_ring, h.device_state, d, c, 4, 2, 8,
                             newest=newest)  # fmt: skip
        assert got[0] is d and got[1] is c
        assert torch.equal(d, want[0]) and torch.equal(c, want[1])
        assert torch.equal(newest, blank)
        h.add([rng.randrange(3) for _ in range(200)])


@interpreter_test
def test_an_empty_ring_drafts_nothing_interpreter():
    h = TokenHistory(64)
    tokens, lengths, drafts, counts = _rows(h, 4, 8, 3, seed=1)
    d, c = _run(history_lookup, h, tokens, lengths, drafts, counts, 4, 2, 8)
    assert torch.equal(c, counts) and torch.equal(d, drafts[:, :4])


def test_bad_arguments_are_named():
    h = TokenHistory(16)
    h.to_device("cpu")
    tokens = torch.zeros((2, 8), dtype=torch.int32)
    lengths = torch.full((2,), 8, dtype=torch.int32)
    drafts, counts = torch.zeros((2, 4), dtype=torch.int32), torch.zeros((2,), dtype=torch.int32)
    ring, state = h.device_ring, h.device_state
    with pytest.raises(ValueError, match="min_n <= max_n"):
        history_lookup(tokens, lengths, ring, state, drafts, counts, 4, 3, 2)
    with pytest.raises(ValueError, match="tokens must be int32"):
        history_lookup(tokens.long(), lengths, ring, state, drafts, counts, 4, 2, 8)
    with pytest.raises(ValueError, match=r"state must be int32 \[3\]"):
        history_lookup(tokens, lengths, ring, state[:1], drafts, counts, 4, 2, 8)
    with pytest.raises(ValueError, match="ring must be"):
        history_lookup(tokens, lengths, ring.long(), state, drafts, counts, 4, 2, 8)
    with pytest.raises(ValueError, match="drafts must be int32"):
        history_lookup(tokens, lengths, ring, state, drafts, counts, 3, 2, 8)
    with pytest.raises(ValueError, match="newest must be lookup_buffer"):
        history_lookup(tokens, lengths, ring, state, drafts, counts, 4, 2, 8,
                       newest=lookup_buffer(2, 3, "cpu"))  # fmt: skip


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    ("capacity", "vocab", "base"), [(2000, 3, 0), (1 << 20, 20, 0), (3000, 4, 50_000)]
)
def test_matches_the_twin_and_host_lookup_gpu(capacity, vocab, base):
    """Up to the default 1M-token ring: 2,048 programs a row find the newest match together;
    and a ring after a datastore's base of 50k tokens."""
    h = _ring(capacity, vocab, seed=capacity, wrap=True, base=base)
    _check(h, rows=8, width=40, vocab=vocab, seed=capacity, device="cuda")


@pytest.mark.gpu
@requires_cuda
def test_a_ring_of_more_chunks_than_a_grid_axis_holds_gpu():
    """40M tokens of base (78k chunks of 512, past the grid's y limit of 65,535): the newest
    match may lie in any chunk, the last ones included."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 50, 40_000_000, dtype=np.int32)
    h = TokenHistory(1 << 16, base, index_depth=0)  # the host scans (no index to build)
    h.add(rng.integers(0, 50, 1000).tolist())
    ends = [1000, 20_000_000, 39_999_000, len(base) - 20]  # rows ending in these base spans
    tokens = torch.stack([torch.from_numpy(base[e - 12 : e]) for e in ends]).to(torch.int32)
    lengths = torch.full((len(ends),), 12, dtype=torch.int32)
    drafts, counts = torch.zeros((len(ends), 4), dtype=torch.int32), torch.zeros_like(lengths)
    d, c = _run(history_lookup, h, tokens, lengths, drafts, counts, 4, 2, 8, device="cuda")
    want = [h.lookup(row.tolist(), 4, 2, 8) for row in tokens]
    assert _as_lists(d, c) == want and all(want)


@pytest.mark.gpu
@requires_cuda
def test_replays_of_a_captured_lookup_follow_the_ring_gpu():
    h = _ring(5000, 4, seed=1, wrap=True)
    h.to_device("cuda")
    tokens, lengths, drafts, counts = (t.cuda() for t in _rows(h, 4, 32, 4, seed=1))
    drafts = drafts[:, :8].contiguous()
    start_drafts, start_counts = drafts.clone(), counts.clone()
    newest = lookup_buffer(4, 8, "cuda")
    args = (tokens, lengths, h.device_ring, h.device_state, drafts, counts, 8, 2, 8)
    history_lookup(*args, newest=newest)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        history_lookup(*args, newest=newest)
    rng = random.Random(2)
    for _ in range(3):
        h.add([rng.randrange(4) for _ in range(700)])  # in place: the graph reads it
        drafts.copy_(start_drafts)
        counts.copy_(start_counts)
        graph.replay()
        want = _host(h, tokens.cpu(), lengths.cpu(), start_drafts.cpu(), start_counts.cpu(),
                     8, 2, 8)  # fmt: skip
        assert _as_lists(drafts, counts) == want
