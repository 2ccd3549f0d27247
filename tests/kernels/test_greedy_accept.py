"""Greedy acceptance on the device against ``greedy_accept_ref``: random verify steps whose
drafts are right up to a chosen point, padding drafts that happen to equal the argmax (never
accepted), rows full to the buffer's end.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.kernels import greedy_accept as kernels  # noqa: E402
from parallm.kernels.greedy_accept import greedy_accept  # noqa: E402
from parallm.kernels.reference import greedy_accept_ref  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(kernels._accept_kernel)


def _step(rows: int, q: int, width: int, seed: int):
    """A verify step of ``rows`` sequences, ``q`` rows each: argmax rows, inputs whose drafts
    match the argmax up to a random point, real draft counts, and the sequences' tokens."""
    g = torch.Generator().manual_seed(seed)
    vocab = 50
    argmax = torch.randint(0, vocab, (rows, q), generator=g)
    ids = torch.randint(0, vocab, (rows, q), generator=g)
    counts = torch.randint(0, q, (rows,), generator=g, dtype=torch.int32)
    for b in range(rows):
        right = int(torch.randint(0, q, (1,), generator=g))
        ids[b, 1 : right + 1] = argmax[b, :right]  # drafts 1..right are what the target says
        if int(counts[b]) < q - 1:  # a padding draft equal to the argmax is still not taken
            ids[b, int(counts[b]) + 1] = argmax[b, int(counts[b])]
    lengths = torch.randint(1, width - q, (rows,), generator=g, dtype=torch.int32)
    lengths[0] = width - 2  # only two of its emitted tokens fit
    tokens = torch.randint(0, vocab, (rows, width), generator=g, dtype=torch.int32)
    return argmax.flatten(), ids.flatten().to(torch.int32), counts, tokens, lengths


def _check(device: str, rows: int, q: int, width: int, seed: int) -> None:
    argmax, ids, counts, tokens, lengths = _step(rows, q, width, seed)
    want_tokens, want_lengths = tokens.clone(), lengths.clone()
    want = greedy_accept_ref(argmax, ids, counts, want_tokens, want_lengths)
    got_tokens, got_lengths = tokens.to(device), lengths.to(device)
    got = greedy_accept(argmax.to(device), ids.to(device), counts.to(device), got_tokens,
                        got_lengths)  # fmt: skip
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got_lengths.cpu(), want_lengths)
    assert torch.equal(got_tokens.cpu(), want_tokens)
    assert (want <= counts).all() and (want < q).all()


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


def test_reference_walks_the_drafts():
    argmax = torch.tensor([7, 8, 9, 4, 5, 6, 1, 2, 3])  # three sequences, q = 3
    ids = torch.tensor([0, 7, 8, 0, 5, 6, 0, 1, 2], dtype=torch.int32)
    counts = torch.tensor([2, 2, 1], dtype=torch.int32)  # the third's second draft is padding
    tokens = torch.zeros((3, 8), dtype=torch.int32)
    lengths = torch.tensor([1, 6, 2], dtype=torch.int32)
    accepted = greedy_accept_ref(argmax, ids, counts, tokens, lengths)
    assert accepted.tolist() == [2, 0, 1]  # all right; the first wrong; the padding not taken
    assert lengths.tolist() == [4, 7, 4]
    assert tokens[0, 1:4].tolist() == [7, 8, 9]  # two drafts, then the bonus
    assert tokens[1, 6:].tolist() == [4, 0]
    assert tokens[2, 2:4].tolist() == [1, 2]


@interpreter_test
@pytest.mark.parametrize(("rows", "q"), [(1, 2), (4, 5), (3, 9), (2, 17)])
def test_matches_the_reference_interpreter(rows, q):
    _check("cpu", rows, q, width=40, seed=rows * q)


def test_bad_arguments_are_named():
    tokens = torch.zeros((2, 8), dtype=torch.int32)
    lengths = torch.ones(2, dtype=torch.int32)
    counts = torch.ones(2, dtype=torch.int32)
    rows = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="tokens must be int32"):
        greedy_accept(rows, rows, counts, tokens.long(), lengths)
    with pytest.raises(ValueError, match="lengths and counts must be int32"):
        greedy_accept(rows, rows, counts.long(), tokens, lengths)
    with pytest.raises(ValueError, match=r"\[B \* q\] for B = 2"):
        greedy_accept(rows[:5], rows[:5], counts, tokens, lengths)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("rows", "q"), [(1, 5), (32, 9), (256, 17)])
def test_matches_the_reference_gpu(rows, q):
    _check("cuda", rows, q, width=1024, seed=rows + q)
