"""The reference of a decode step's input advance (``advance_inputs_ref``, which the decode graph
also uses to predict its inputs) against the rule written out row by row; the kernel version is
checked against the reference in test_argmax.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallm.kernels.argmax import DecodeInputs, advance_inputs_ref


def random_inputs(rows: int, max_blocks: int, block_size: int, seed: int) -> DecodeInputs:
    """Random positions (some in a row's last block, where the column clamps), lengths one
    past them, random tables, and slots that do not match the tables (to be overwritten)."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_blocks * block_size, (rows,), generator=g)
    positions[0] = max_blocks * block_size - 1  # the next position is past the table
    tables = torch.randint(0, 1000, (rows, max_blocks), generator=g, dtype=torch.int32)
    slots = torch.randint(0, 10**6, (rows,), generator=g)
    return DecodeInputs(positions, (positions + 1).int(), slots, tables, block_size)


def host_arrays(inputs: DecodeInputs) -> list[np.ndarray]:
    fields = ("positions", "seq_lens", "slot_mapping", "block_tables")
    return [getattr(inputs, f).numpy().copy() for f in fields]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_advance_follows_the_rule(block_size, seed):
    inputs = random_inputs(7, 6, block_size, seed)
    positions, seq_lens, slots, tables = host_arrays(inputs)
    before_pos, before_len = positions.copy(), seq_lens.copy()
    advance_inputs_ref(positions, seq_lens, slots, tables, block_size)
    assert np.array_equal(positions, before_pos + 1)
    assert np.array_equal(seq_lens, before_len + 1)
    for row in range(7):
        col = min(int(positions[row]) // block_size, tables.shape[1] - 1)  # clamped
        want = int(tables[row, col]) * block_size + int(positions[row]) % block_size
        assert int(slots[row]) == want, row


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
