"""Token shards: a token stream stored as numbered ``.npy`` files, read back memory-mapped."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shards(
    chunks: Iterable[list[int]], out_dir: Path, prefix: str, shard_tokens: int, dtype: np.dtype
) -> int:
    """Concatenate token chunks into ``{prefix}_{i:05d}.npy`` files of ``shard_tokens`` each.

    Returns the number of tokens written. The last shard may be shorter.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = np.empty(shard_tokens, dtype=dtype)
    filled, index, total = 0, 0, 0
    for chunk in chunks:
        data = np.asarray(chunk, dtype=dtype)
        while len(data):
            take = min(len(data), shard_tokens - filled)
            buffer[filled : filled + take] = data[:take]
            filled, data = filled + take, data[take:]
            if filled == shard_tokens:
                np.save(out_dir / f"{prefix}_{index:05d}.npy", buffer)
                index, total, filled = index + 1, total + filled, 0
    if filled:
        np.save(out_dir / f"{prefix}_{index:05d}.npy", buffer[:filled])
        total += filled
    return total


class TokenShards:
    """A read-only view of ``{prefix}_*.npy`` as one long token array."""

    def __init__(self, directory: Path, prefix: str) -> None:
        files = sorted(directory.glob(f"{prefix}_*.npy"))
        self.arrays = [np.load(f, mmap_mode="r") for f in files]
        self.starts = [0]
        for array in self.arrays:
            self.starts.append(self.starts[-1] + len(array))

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)``, which may span shard boundaries."""
        if not 0 <= start < stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside [0, {len(self)})")
        pieces = []
        shard = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            offset = start - self.starts[shard]
            take = min(stop - start, len(self.arrays[shard]) - offset)
            pieces.append(self.arrays[shard][offset : offset + take])
            start, shard = start + take, shard + 1
        # np.array copies, so callers never hold a view into the memory map.
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])
