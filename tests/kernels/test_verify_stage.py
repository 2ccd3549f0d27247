"""The next verify step staged on the device against ``stage_chain_step_ref`` and against what
``VerifyGraphs`` stages from the host for the same sequences and drafts (the region's ids,
positions, slots and lengths; the sampling rows are every row on the device).

Without CUDA the kernels run under the Triton interpreter (see ``triton_interpreter``).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from triton_interpreter import check_interpreter_suite, kernel_modes  # before triton

triton = pytest.importorskip("triton")

from parallm.engine.step_inputs import StepInputs  # noqa: E402
from parallm.engine.verify_graph import VerifyGraphs, VerifyShape  # noqa: E402
from parallm.kernels import verify_stage as kernels  # noqa: E402
from parallm.kernels.reference import stage_chain_step_ref  # noqa: E402
from parallm.kernels.verify_stage import stage_chain_step  # noqa: E402

INTERPRETING, interpreter_test, requires_cuda = kernel_modes(kernels._stage_kernel)

BLOCK_SIZE = 4
SCRATCH = 99  # the scratch block


def _state(rows: int, size: int, q: int, seed: int):
    """``rows`` sequences (of a shape of ``size``): tokens, lengths, drafts (up to q - 1, some
    none) and block tables with a distinct block for every position up to length - 1 + q."""
    g = torch.Generator().manual_seed(seed)
    width = 40
    tokens = torch.randint(1, 1000, (rows, width), generator=g, dtype=torch.int32)
    lengths = torch.randint(1, width - q, (rows,), generator=g, dtype=torch.int32)
    drafts = torch.randint(1, 1000, (rows, q - 1), generator=g, dtype=torch.int32)
    counts = torch.randint(0, q, (rows,), generator=g, dtype=torch.int32)
    columns = -(-(width + q) // BLOCK_SIZE)
    blocks = torch.randperm(size * columns, generator=g).to(torch.int32)
    tables = blocks.view(size, columns)
    return tokens, lengths, drafts, counts, tables


def _buffers(size: int, q: int, device: str) -> dict[str, torch.Tensor]:
    out = {n: torch.full((size * q,), -5, dtype=torch.int64, device=device)
           for n in ("input_ids", "positions", "slot_mapping", "sample_rows")}  # fmt: skip
    out["seq_lens"] = torch.full((size,), -5, dtype=torch.int32, device=device)
    return out


def _staged_on(device: str, state, size: int, q: int) -> dict[str, torch.Tensor]:
    out = _buffers(size, q, device)
    stage_chain_step(*(t.to(device) for t in state), out, BLOCK_SIZE, SCRATCH * BLOCK_SIZE)
    return {n: t.cpu() for n, t in out.items()}


def _check_against_reference(device: str, rows: int, size: int, q: int) -> None:
    state = _state(rows, size, q, seed=rows + q)
    want = _buffers(size, q, "cpu")
    stage_chain_step_ref(*state, want, BLOCK_SIZE, SCRATCH * BLOCK_SIZE)
    got = _staged_on(device, state, size, q)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _host_staged(state, size: int, q: int):
    """What ``VerifyGraphs._staged`` copies in for the same step, built as the runner would."""
    tokens, lengths, drafts, counts, tables = state
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for b in range(len(lengths)):
        length, count = int(lengths[b]), int(counts[b])
        ids += [int(tokens[b, length - 1]), *drafts[b, :count].tolist()]
        for position in range(length - 1, length + count):
            block = int(tables[b, position // BLOCK_SIZE])
            positions.append(position)
            slots.append(block * BLOCK_SIZE + position % BLOCK_SIZE)
        starts.append(starts[-1] + 1 + count)
        seq_lens.append(length + count)
    total = starts[-1]
    inputs = StepInputs(
        input_ids=np.array(ids, np.int64), positions=np.array(positions, np.int64),
        slot_mapping=np.array(slots, np.int64), query_start_loc=np.array(starts, np.int32),
        seq_lens=np.array(seq_lens, np.int32), block_tables=tables[: len(lengths)].numpy(),
        sample_indices=np.arange(total),
    )  # fmt: skip
    graphs = SimpleNamespace(scratch_block=SCRATCH, block_size=BLOCK_SIZE,
                             device=torch.device("cpu"))  # fmt: skip
    graphs._tables = functools.partial(VerifyGraphs._tables, graphs)
    shape = VerifyShape(size, q, tree=False)
    head, _, lens = VerifyGraphs._staged(graphs, shape, inputs)
    return shape.layout.tokens(head), lens


def test_interpreter_suite_in_subprocess():
    """The interpreter tests run: here when triton was imported in interpreter mode, else in a
    subprocess that sets TRITON_INTERPRET before triton's first import."""
    check_interpreter_suite(__file__, INTERPRETING)


@pytest.mark.parametrize(("rows", "size", "q"), [(1, 1, 2), (3, 4, 5), (4, 4, 9)])
def test_reference_stages_what_the_host_stages(rows, size, q):
    state = _state(rows, size, q, seed=rows * q)
    out = _buffers(size, q, "cpu")
    stage_chain_step_ref(*state, out, BLOCK_SIZE, SCRATCH * BLOCK_SIZE)
    host_rows, host_lens = _host_staged(state, size, q)
    real = rows * q
    for i, name in enumerate(("input_ids", "positions", "slot_mapping")):
        assert out[name][:real].tolist() == host_rows[i, :real].tolist(), name
    assert out["seq_lens"][:rows].tolist() == host_lens[:rows]
    assert out["sample_rows"][:real].tolist() == list(range(real))
    # Padding sequences' rows are the graph's as captured: untouched here.
    assert (out["input_ids"][real:] == -5).all() and (out["seq_lens"][rows:] == -5).all()


@interpreter_test
@pytest.mark.parametrize(("rows", "size", "q"), [(1, 1, 2), (3, 4, 5), (4, 4, 9), (2, 8, 17)])
def test_matches_the_reference_interpreter(rows, size, q):
    _check_against_reference("cpu", rows, size, q)


def test_bad_buffers_are_named():
    state = _state(2, 4, 5, seed=0)
    out = _buffers(4, 5, "cpu")
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        stage_chain_step(*state, {**out, "seq_lens": out["seq_lens"].long()}, 4, 0)
    with pytest.raises(ValueError, match="must hold S \\* q tokens"):
        stage_chain_step(*state, {**out, "positions": out["positions"][:-1]}, 4, 0)
    with pytest.raises(ValueError, match="drafts must be int32"):
        stage_chain_step(*state, _buffers(4, 3, "cpu"), 4, 0)  # 4 drafts do not fit q = 3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("rows", "size", "q"), [(1, 1, 9), (5, 8, 5), (64, 64, 17)])
def test_matches_the_reference_gpu(rows, size, q):
    _check_against_reference("cuda", rows, size, q)
