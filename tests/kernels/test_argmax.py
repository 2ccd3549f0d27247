"""The Triton greedy argmax against its twin ``argmax_ref`` (``torch.argmax`` with NaN as
+inf): random logits, planted ties, -inf rows, NaNs.

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.engine.sampler import greedy_argmax  # noqa: E402
from parallm.kernels import argmax  # noqa: E402
from parallm.kernels.argmax import triton_argmax  # noqa: E402
from parallm.kernels.reference import argmax_ref  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(argmax._chunk_argmax_kernel)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 4
    # Plant exact ties of the row maximum, one of them in a later chunk, to pin tie-breaking.
    for r in range(rows):
        top = x[r].max() + 1
        cols = torch.randint(0, vocab, (3,), generator=g)
        x[r, cols] = top
    return x.to(dtype).to(device)


def _check(device: str, rows: int, vocab: int, dtype: torch.dtype, seed: int) -> None:
    x = _logits(rows, vocab, dtype, device, seed)
    got = triton_argmax(x)
    assert got.dtype == torch.long and got.shape == (rows,)
    assert torch.equal(got, argmax_ref(x))


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@interpreter_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "vocab"), [(1, 1000), (3, 4096), (2, 9000), (5, 32000)])
def test_matches_torch_argmax_interpreter(rows, vocab, dtype):
    _check("cpu", rows, vocab, dtype, seed=rows * vocab)


@interpreter_test
def test_edge_rows_interpreter():
    x = torch.full((3, 5000), float("-inf"))
    x[1, 4999] = 0.0  # the last column of a partial chunk
    x[2, 4096] = 1.0  # the first column of the second chunk
    assert triton_argmax(x).tolist() == [0, 4999, 4096]
    assert triton_argmax(x[:0]).shape == (0,)


@interpreter_test
def test_nan_counts_as_inf_interpreter():
    """A NaN wins over every finite logit, and ties with +inf: the first of them wins."""
    x = torch.randn(3, 9000, generator=torch.Generator().manual_seed(8)) * 4
    x[0, 5000] = float("nan")
    x[1, 7000], x[1, 8000] = float("inf"), float("nan")
    x[2, 100], x[2, 4500] = float("nan"), float("inf")
    assert triton_argmax(x).tolist() == argmax_ref(x).tolist() == [5000, 7000, 100]


@interpreter_test
def test_also_into_receives_the_same_ids_interpreter():
    x = torch.randn(3, 9000, generator=torch.Generator().manual_seed(4))
    also = torch.full((3,), -1, dtype=torch.long)
    out = triton_argmax(x, also_into=also)
    assert torch.equal(out, x.argmax(dim=-1)) and torch.equal(also, out)
    with pytest.raises(ValueError, match="contiguous int64"):
        triton_argmax(x, also_into=torch.zeros(3, dtype=torch.int32))


def _check_advance(device: str) -> None:
    """The argmax kernel's input advance equals ``advance_inputs_ref`` on random inputs, and
    leaves the ids as they were."""
    from test_next_inputs import host_arrays, random_inputs

    from parallm.kernels.argmax import DecodeInputs, advance_inputs_ref

    fields = ("positions", "seq_lens", "slot_mapping", "block_tables")
    for block_size in (1, 16):
        inputs = random_inputs(5, 6, block_size, seed=block_size)
        want = host_arrays(inputs)
        got = DecodeInputs(*(getattr(inputs, f).clone().to(device) for f in fields), block_size)
        x = _logits(5, 9000, torch.float32, device, seed=3)
        also = torch.full((5,), -1, dtype=torch.long, device=device)
        ids = triton_argmax(x, also_into=also, advance=got)
        advance_inputs_ref(*want, block_size)
        assert torch.equal(ids.cpu(), x.cpu().argmax(dim=-1)) and torch.equal(also, ids)
        for field, array in zip(fields, want, strict=True):
            assert np.array_equal(getattr(got, field).cpu().numpy(), array), field


@interpreter_test
def test_advance_inputs_interpreter():
    _check_advance("cpu")


def _check_host_ring(device: str) -> None:
    """Calls alternate the ring's rows; the host's mirrored turn names the row just written."""
    from parallm.engine.decode_graph import HostRing

    ring = HostRing.allocate(4, torch.device(device))
    for call in range(3):
        x = _logits(4, 9000, torch.float32, device, seed=10 + call)
        row = ring.flip()
        ids = triton_argmax(x, host_ids=(ring.ids, ring.turn))
        if device == "cuda":
            torch.cuda.synchronize()
        assert torch.equal(row, ids.cpu()) and torch.equal(row, x.cpu().argmax(dim=-1))
        assert int(ring.turn) == ring.host_turn == (call + 1) % 2
    assert not torch.equal(ring.ids[0], ring.ids[1])
    ring.reset()
    assert int(ring.turn) == ring.host_turn == 0
    with pytest.raises(ValueError, match="host_ids"):
        triton_argmax(
            _logits(3, 100, torch.float32, device, seed=1), host_ids=(ring.ids, ring.turn)
        )


@interpreter_test
def test_host_ring_interpreter():
    _check_host_ring("cpu")


def test_rejects_non_contiguous_rows():
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_argmax(torch.zeros(4, 6)[:, ::2])


def test_greedy_argmax_falls_back_to_torch():
    x = torch.randn(4, 100)
    assert torch.equal(greedy_argmax(x, fused=False), x.argmax(dim=-1))
    assert torch.equal(greedy_argmax(x[:, ::2], fused=True), x[:, ::2].argmax(dim=-1))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 128])
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
def test_matches_torch_argmax_cuda(rows, vocab, dtype):
    _check("cuda", rows, vocab, dtype, seed=rows + vocab)


@pytest.mark.gpu
@requires_cuda
def test_advance_inputs_cuda():
    _check_advance("cuda")


@pytest.mark.gpu
@requires_cuda
def test_host_ring_cuda():
    """The kernel writes pinned host memory directly (mapped into the GPU's address space)."""
    _check_host_ring("cuda")


@pytest.mark.gpu
@requires_cuda
def test_captured_in_cuda_graph():
    x = _logits(4, 128256, torch.bfloat16, "cuda", seed=1)
    triton_argmax(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_argmax(x)
    for seed in range(2, 5):
        x.copy_(_logits(4, 128256, torch.bfloat16, "cuda", seed=seed))
        graph.replay()
        assert torch.equal(out, x.float().argmax(dim=-1))
