"""The host prediction of a decode step's advanced inputs against the PyTorch version (the
kernel version is checked against the same reference in test_argmax.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallm.engine.next_inputs import DecodeInputs, advance_host, advance_torch


def random_inputs(rows: int, max_blocks: int, block_size: int, seed: int) -> DecodeInputs:
    """Random positions (some in a row's last block, where the column clamps), lengths one
    past them, random tables, and slots that do not match the tables (to be overwritten)."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_blocks * block_size, (rows,), generator=g)
    positions[0] = max_blocks * block_size - 1  # the next position is past the table
    tables = torch.randint(0, 1000, (rows, max_blocks), generator=g, dtype=torch.int32)
    slots = torch.randint(0, 10**6, (rows,), generator=g)
    return DecodeInputs(positions, (positions + 1).int(), slots, tables, block_size)


def _host_arrays(inputs: DecodeInputs) -> list[np.ndarray]:
    fields = ("positions", "seq_lens", "slot_mapping", "block_tables")
    return [getattr(inputs, f).numpy().copy() for f in fields]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_host_prediction_equals_torch(block_size, seed):
    inputs = random_inputs(7, 6, block_size, seed)
    host = _host_arrays(inputs)
    before = inputs.positions.clone()
    advance_torch(inputs)
    advance_host(*host, block_size)
    assert torch.equal(inputs.positions, before + 1)
    for got, want in zip(host, _host_arrays(inputs), strict=True):
        assert np.array_equal(got, want)
    # Slots follow the tables: block of the new position (clamped) times block_size + offset.
    col = min(int(inputs.positions[3]) // block_size, 5)
    want = int(inputs.block_tables[3, col]) * block_size + int(inputs.positions[3]) % block_size
    assert int(inputs.slot_mapping[3]) == want


def test_bad_inputs_name_the_field():
    ok = random_inputs(3, 4, 16, 0)
    with pytest.raises(ValueError, match="seq_lens"):
        DecodeInputs(ok.positions, ok.seq_lens.long(), ok.slot_mapping, ok.block_tables, 16).check(
            3
        )
    with pytest.raises(ValueError, match="block_tables"):
        DecodeInputs(ok.positions, ok.seq_lens, ok.slot_mapping, ok.block_tables[:2], 16).check(3)
    with pytest.raises(ValueError, match="block_size"):
        DecodeInputs(ok.positions, ok.seq_lens, ok.slot_mapping, ok.block_tables, 0).check(3)
    with pytest.raises(ValueError, match="positions"):
        ok.check(4)
