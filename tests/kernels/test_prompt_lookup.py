"""Prompt lookup on the device against its twins: ``prompt_lookup_ref`` and the host drafter's
``propose_ngram``, on random token rows over a small vocabulary (so that n-grams recur, the
earliest and latest occurrences mostly differing), rows longer than one program's chunk, hand
rows whose latest occurrence is not the earliest (in one chunk and across chunks), and the
edge rows (empty, one token, nothing recurring, a repeating run shorter than the draft, which
repeats).

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.engine.spec.ngram import propose_ngram  # noqa: E402
from parallm.kernels import prompt_lookup as kernels  # noqa: E402
from parallm.kernels.prompt_lookup import lookup_buffer, prompt_lookup  # noqa: E402
from parallm.kernels.reference import prompt_lookup_ref  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(kernels._match_kernel)

# (num_tokens, min_n, max_n): vLLM's defaults and the benches' settings.
SETTINGS = [(4, 2, 5), (8, 1, 3), (3, 3, 3), (16, 1, 8)]


def _rows(rows: int, width: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens ``[rows, width]`` and lengths: full rows, short ones, and 0, 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, width), generator=g, dtype=torch.int32)
    lengths = torch.randint(3, width + 1, (rows,), generator=g, dtype=torch.int32)
    lengths[0] = width
    lengths[1 % rows] = min(2, width)
    return tokens, lengths


def _host(tokens: torch.Tensor, lengths: torch.Tensor, k: int, lo: int, hi: int) -> list[list]:
    return [propose_ngram(tokens[b, : int(n)].tolist(), k, lo, hi) for b, n in enumerate(lengths)]


def _as_lists(drafts: torch.Tensor, counts: torch.Tensor) -> list[list[int]]:
    return [drafts[b, : int(c)].tolist() for b, c in enumerate(counts.cpu())]


def _check(device: str, rows: int, width: int, vocab: int, seed: int) -> None:
    tokens, lengths = _rows(rows, width, vocab, seed)
    for k, lo, hi in SETTINGS:
        want = _host(tokens, lengths, k, lo, hi)
        ref_drafts, ref_counts = prompt_lookup_ref(tokens, lengths, k, lo, hi)
        assert _as_lists(ref_drafts, ref_counts) == want
        drafts, counts = prompt_lookup(tokens.to(device), lengths.to(device), k, lo, hi)
        assert torch.equal(counts.cpu(), ref_counts), (k, lo, hi)
        assert torch.equal(drafts.cpu(), ref_drafts), (k, lo, hi)


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@pytest.mark.parametrize(("vocab", "seed"), [(3, 0), (8, 1), (50, 2)])
def test_reference_is_the_host_drafter(vocab, seed):
    tokens, lengths = _rows(6, 90, vocab, seed)
    for k, lo, hi in SETTINGS:
        drafts, counts = prompt_lookup_ref(tokens, lengths, k, lo, hi)
        assert _as_lists(drafts, counts) == _host(tokens, lengths, k, lo, hi)
        assert all(drafts[b, int(c) :].eq(0).all() for b, c in enumerate(counts))


@interpreter_test
@pytest.mark.parametrize(("rows", "width", "vocab"), [(4, 40, 3), (3, 300, 6), (2, 700, 40)])
def test_matches_the_host_drafter_interpreter(rows, width, vocab):
    """Rows of up to three programs' chunks: the latest match may lie in any of them."""
    _check("cpu", rows, width, vocab, seed=rows * width)


def _hand_rows(rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros((len(rows), width), dtype=torch.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.int32)


@interpreter_test
def test_edge_rows_interpreter():
    # A repeating run shorter than the draft: the latest "7 8 9" before the last token leaves
    # only 7 8 9 after it, which repeats up to the 8 drafts; so does a run of one token.
    run = [7, 8, 9] * 3
    rows = [[], [5], [5, 5], [1, 2, 3, 4, 5, 6], run, [4, 1, 2, 9, 1, 2]]
    tokens, lengths = _hand_rows(rows, 12)
    drafts, counts = prompt_lookup(tokens, lengths, 8, 1, 3)
    assert _as_lists(drafts, counts) == [
        [], [], [5] * 8, [], [7, 8, 9, 7, 8, 9, 7, 8], [9, 1, 2, 9, 1, 2, 9, 1]
    ]  # fmt: skip
    assert _as_lists(drafts, counts) == [propose_ngram(r, 8, 1, 3) for r in rows]


def _latest_rows() -> list[list[int]]:
    """Rows whose latest occurrence is not their earliest: in one program's chunk, in a later
    chunk than the earliest (programs race to the buffer), and a longer n that recurs only
    in an early chunk against a shorter one that recurs later."""
    near = [1, 2, 3, 1, 2, 4, 1, 2]  # "1 2" at 0 and 3: the latest is followed by 4
    far = [9] * 700
    far[10:13], far[300:303], far[600:603] = [1, 2, 5], [1, 2, 6], [1, 2, 7]
    far[-2:] = [1, 2]  # "1 2" in the first, second and third chunks: the third's wins
    longer = [9] * 700
    longer[20:24], longer[650:653] = [3, 1, 2, 8], [1, 2, 6]
    longer[-3:] = [3, 1, 2]  # "3 1 2" only at 20: it beats the later "1 2"
    return [near, far, longer]


def test_latest_rows_by_hand():
    """The hand rows' drafts, by the host drafter and the twin."""
    rows = _latest_rows()
    want = [[4, 1, 2], [7, 9, 9], [8, 9, 9]]
    assert [propose_ngram(r, 3, 2, 3) for r in rows] == want
    assert _as_lists(*prompt_lookup_ref(*_hand_rows(rows, 700), 3, 2, 3)) == want


@interpreter_test
def test_latest_rows_interpreter():
    rows = _latest_rows()
    drafts, counts = prompt_lookup(*_hand_rows(rows, 700), 3, 2, 3)
    assert _as_lists(drafts, counts) == [[4, 1, 2], [7, 9, 9], [8, 9, 9]]


@interpreter_test
@pytest.mark.parametrize(("vocab", "seed"), [(2, 11), (3, 12), (4, 13)])
def test_fresh_small_vocabulary_rows_interpreter(vocab, seed):
    """Host, twin and kernel on fresh rows over 2 to 4 tokens (every n-gram recurs many times,
    so the policy decides every row), across two programs' chunks."""
    _check("cpu", 5, 400, vocab, seed)


@interpreter_test
def test_buffers_are_written_in_place_and_left_clean_interpreter():
    """A captured graph calls it again and again on its own buffers: ``latest`` is back to
    "no match" after each call, so the next call's rows are not the last one's."""
    tokens, lengths = _rows(3, 64, 4, seed=5)
    latest = lookup_buffer(3, 5, "cpu")
    blank = latest.clone()
    drafts = torch.full((3, 4), -7, dtype=torch.int32)
    counts = torch.full((3,), -7, dtype=torch.int32)
    for seed in (5, 6):
        tokens, lengths = _rows(3, 64, 4, seed=seed)
        got = prompt_lookup(tokens, lengths, 4, 2, 5, latest=latest, drafts=drafts,
                            counts=counts)  # fmt: skip
        assert got[0] is drafts and got[1] is counts
        want = prompt_lookup_ref(tokens, lengths, 4, 2, 5)
        assert torch.equal(drafts, want[0]) and torch.equal(counts, want[1])
        assert torch.equal(latest, blank)


def test_bad_arguments_are_named():
    tokens = torch.zeros((2, 8), dtype=torch.int32)
    lengths = torch.full((2,), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="min_n <= max_n"):
        prompt_lookup(tokens, lengths, 4, 3, 2)
    with pytest.raises(ValueError, match="num_tokens >= 1"):
        prompt_lookup(tokens, lengths, 0, 1, 2)
    with pytest.raises(ValueError, match="tokens must be int32"):
        prompt_lookup(tokens.long(), lengths, 4, 1, 2)
    with pytest.raises(ValueError, match="lengths must be int32"):
        prompt_lookup(tokens, lengths.long(), 4, 1, 2)
    with pytest.raises(ValueError, match="latest must be lookup_buffer"):
        prompt_lookup(tokens, lengths, 4, 1, 2, latest=lookup_buffer(2, 5, "cpu"))
    with pytest.raises(ValueError, match="drafts must be int32"):
        prompt_lookup(tokens, lengths, 4, 1, 2, drafts=torch.zeros((2, 3), dtype=torch.int32))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("rows", "width", "vocab"), [(8, 100, 3), (4, 5000, 20), (2, 131072, 50)])
def test_matches_the_host_drafter_gpu(rows, width, vocab):
    """Up to a 128k-token context: 512 programs a row find the latest match together."""
    _check("cuda", rows, width, vocab, seed=width)


@pytest.mark.gpu
@requires_cuda
def test_replays_of_a_captured_lookup_gpu():
    tokens, lengths = (t.cuda() for t in _rows(4, 2000, 5, seed=1))
    latest = lookup_buffer(4, 5, "cuda")
    drafts = torch.zeros((4, 8), dtype=torch.int32, device="cuda")
    counts = torch.zeros((4,), dtype=torch.int32, device="cuda")
    kw = {"latest": latest, "drafts": drafts, "counts": counts}
    prompt_lookup(tokens, lengths, 8, 2, 5, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prompt_lookup(tokens, lengths, 8, 2, 5, **kw)
    for seed in (2, 3):
        new_tokens, new_lengths = _rows(4, 2000, 5, seed=seed)
        tokens.copy_(new_tokens)
        lengths.copy_(new_lengths)
        graph.replay()
        want = prompt_lookup_ref(new_tokens, new_lengths, 8, 2, 5)
        assert torch.equal(drafts.cpu(), want[0]) and torch.equal(counts.cpu(), want[1])
