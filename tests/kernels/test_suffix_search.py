"""The base's search on the device (kernels/suffix_search.py) against the host's walk of the same
suffix index (``SuffixIndex.walk``): for every n, the newest end of the row's last n tokens
that a token follows. Bases large enough for several K-ary rounds and ranges over many blocks
of the index's minima; rows with drafts of their own are left alone.

Without CUDA the kernel runs under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.engine.spec.history import SEPARATOR  # noqa: E402
from parallm.engine.spec.suffix_index import SuffixIndex  # noqa: E402
from parallm.kernels import suffix_search as kernels  # noqa: E402
from parallm.kernels.prompt_lookup import lookup_buffer  # noqa: E402
from parallm.kernels.suffix_search import search_base, search_rounds  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(kernels._base_search_kernel)
MAX_N = 8


def _base(size: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, size, dtype=np.int32)
    base[rng.random(size) < 0.01] = SEPARATOR
    return base


def _rows(base: np.ndarray, rows: int, width: int, vocab: int, seed: int):
    """Half the rows end in a slice of the base (long matches), half are random; lengths from 1
    to ``width``; every fourth row has drafts of its own."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, width), dtype=np.int32)
    lengths = rng.integers(1, width + 1, rows).astype(np.int32)
    for b in range(0, rows, 2):
        at = int(rng.integers(0, len(base) - width))
        tokens[b] = np.maximum(base[at : at + width], 0)
        lengths[b] = width
    counts = np.zeros(rows, dtype=np.int32)
    counts[3::4] = 2
    return torch.from_numpy(tokens), torch.from_numpy(lengths), torch.from_numpy(counts)


def _walks(index: SuffixIndex, tokens, lengths, counts) -> torch.Tensor:
    """``newest`` as the search should leave it: -1 where nothing (or the row drafted)."""
    want = torch.full((len(tokens), triton.next_power_of_2(MAX_N + 1)), -1, dtype=torch.int32)
    for b, (row, length) in enumerate(zip(tokens.tolist(), lengths.tolist(), strict=True)):
        if int(counts[b]):
            continue
        walk = index.walk(row[:length])
        for n in range(1, min(MAX_N, length) + 1):
            want[b, n] = walk.end(n)
    return want


def _check(size: int, vocab: int, seed: int, device: str) -> None:
    base = _base(size, vocab, seed)
    index = SuffixIndex(base, MAX_N, SEPARATOR)
    ring = torch.from_numpy(np.concatenate([base, [SEPARATOR] * 9]).astype(np.int32))
    tokens, lengths, counts = _rows(base, 12, 24, vocab, seed)
    want = _walks(index, tokens, lengths, counts)
    assert (want[:, 1] >= 0).any() and (want[:, MAX_N] >= 0).any()  # short and long matches
    newest = lookup_buffer(len(tokens), MAX_N, device)
    search_base(tokens.to(device), lengths.to(device), counts.to(device), ring.to(device),
                index.to_device(device), size, newest, MAX_N)  # fmt: skip
    assert torch.equal(newest.cpu(), want)


def test_interpreter_suite_in_subprocess():
    check_interpreter_suite(__file__, INTERPRETING)


def test_rounds_take_any_range_down_to_one_step():
    assert search_rounds(128) == 0 and search_rounds(129) == 1
    assert search_rounds(103_000_000) == 3 and search_rounds(2**30) == 4
    for size in (129, 5000, 16_641, 16_642, 10**7):  # the width bound after each round
        width = size
        for _ in range(search_rounds(size)):
            width = width // 129 + 1
        assert width <= 128


@interpreter_test
@pytest.mark.parametrize(("size", "vocab"), [(300, 3), (40_000, 3), (40_000, 40), (17_000, 2)])
def test_matches_the_host_walk_interpreter(size, vocab):
    """Up to two K-ary rounds, ranges of thousands of entries (the sparse table's upper
    levels), and long matches of slices of the base."""
    _check(size, vocab, seed=size + vocab, device="cpu")


def test_an_index_shallower_than_max_n_is_refused():
    index = SuffixIndex(_base(500, 4, 0), 4, SEPARATOR).to_device("cpu")
    rows = torch.zeros((1, 8), dtype=torch.int32)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="answers n up to 4, not 8"):
        search_base(rows, one, one, rows[0], index, 500, lookup_buffer(1, 8, "cpu"), 8)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("size", "vocab"), [(40_000, 3), (3_000_000, 20), (3_000_000, 8192)])
def test_matches_the_host_walk_gpu(size, vocab):
    """Compiled, up to three rounds' worth of range and a vocabulary the size of the code
    model's."""
    _check(size, vocab, seed=size + vocab, device="cuda")


def test_device_bytes_are_what_the_device_copy_allocates():
    """The engine keeps these bytes out of the KV cache's share (the copy comes after it)."""
    from parallm.engine.spec.history import TokenHistory

    h = TokenHistory(1000, _base(40_000, 5, 1))
    want = h.device_bytes()
    h.to_device("cpu")
    arrays = (h.device_ring, *h.device_index[:4])
    assert want == sum(t.numel() * t.element_size() for t in arrays)
    assert TokenHistory(64).device_bytes() == 64 * 4  # no base, no index
