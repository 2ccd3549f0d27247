"""A decode step's inputs advanced to the next token, written on the device by the step itself.

A greedy continuation of the same batch feeds each sequence its next position, a length one
longer, and the slot of that position in its block table. A decode CUDA graph that writes
those into its own input buffers (next to its greedy ids, ``triton_argmax``'s ``also_into``)
leaves the host nothing to copy until a table changes, which at batch 1 takes the input copy
(~10 us of idle GPU a step on an H100) off 15 steps out of 16. The host predicts the advanced
values with :func:`advance_host` and copies only when its real inputs differ from them, so
every implementation here must compute exactly the same numbers:

    position += 1; seq_len += 1;
    slot = block_tables[row, min(position // block_size, max_blocks - 1)] * block_size
           + position % block_size

(the column is clamped so a row at its last block never reads past its table; the host's real
slot then differs and it copies). The kernel version is ``parallm.kernels.argmax.advance_row``,
inside the greedy argmax's last kernel; this module stays free of triton for the host side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DecodeInputs:
    """The device buffers a decode graph reads: positions [B] int64, seq_lens [B] int32,
    slot_mapping [B] int64 and block_tables [B, max_blocks] int32 (rows contiguous)."""

    positions: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    block_size: int

    def check(self, rows: int) -> None:
        """Shapes and dtypes the kernel relies on (it indexes them by row)."""
        want = {"positions": torch.long, "seq_lens": torch.int32, "slot_mapping": torch.long}
        for name, dtype in want.items():
            t = getattr(self, name)
            if t.shape != (rows,) or t.dtype != dtype or t.stride(0) != 1:
                raise ValueError(f"next inputs: {name} must be a contiguous {dtype} [{rows}]")
        tables = self.block_tables
        if tables.dim() != 2 or tables.shape[0] != rows or tables.dtype != torch.int32:
            raise ValueError(f"next inputs: block_tables must be int32 [{rows}, max_blocks]")
        if tables.stride(1) != 1:
            raise ValueError("next inputs: block_tables needs contiguous rows")
        if self.block_size < 1:
            raise ValueError(f"next inputs: block_size must be >= 1, got {self.block_size}")


def advance_torch(inputs: DecodeInputs) -> None:
    """The same in PyTorch ops (the unfused path), in place."""
    bs, tables = inputs.block_size, inputs.block_tables
    inputs.positions.add_(1)
    inputs.seq_lens.add_(1)
    cols = torch.clamp(inputs.positions // bs, max=tables.shape[1] - 1)
    blocks = tables.gather(1, cols[:, None])[:, 0].long()
    inputs.slot_mapping.copy_(blocks * bs + inputs.positions % bs)


def advance_host(
    positions: np.ndarray,
    seq_lens: np.ndarray,
    slot_mapping: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
) -> None:
    """The same on host arrays, in place: what the device holds after the step."""
    positions += 1
    seq_lens += 1
    cols = np.minimum(positions // block_size, block_tables.shape[1] - 1)
    blocks = block_tables[np.arange(len(positions)), cols].astype(np.int64)
    slot_mapping[:] = blocks * block_size + positions % block_size
