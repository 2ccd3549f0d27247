"""Paged KV cache bookkeeping: block allocator, reference counts and the prefix cache.

Blocks hold ``block_size`` tokens. A full block is identified by a hash of its tokens chained
with its parent block's hash, so equal hashes mean equal prefixes. Blocks whose reference count
drops to zero stay cached (and reusable) in the free queue until they are evicted, least
recently freed first. This module only does bookkeeping; the tensors live in the runner.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from parallm.engine.request import Sequence

_ROOT_HASH = b""


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Chained, collision-resistant hash of one full block of tokens."""
    payload = np.asarray(tokens, dtype=np.int64).tobytes()
    return hashlib.blake2b(parent + payload, digest_size=16).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class KVCacheManager:
    """Hands out blocks to sequences and shares full blocks between equal prefixes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the front is reused first.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the sequence's longest cached prefix (leaving at least one token)."""
        if not (self.enable_prefix_caching or seq.share_prefix) or seq.wants_prompt_logprobs:
            return []  # prompt logprobs need the logits of every prompt position, cached or not
        # The last token must be computed to produce logits, so never match the whole sequence.
        num_full = (seq.num_tokens - 1) // self.block_size
        cached = (self.cached.get(h) for h in self._full_block_hashes(seq, num_full))
        return list(itertools.takewhile(lambda block_id: block_id is not None, cached))

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_hits: list[int] = ()) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens; False (and no change) if full."""
        if prefix_hits and seq.block_table:
            raise RuntimeError("prefix hits apply only to a sequence that holds no blocks")
        reviving = sum(1 for b in prefix_hits if self.blocks[b].ref_count == 0)
        computed = len(prefix_hits) * self.block_size or seq.num_computed_tokens
        need = self._new_blocks(computed + num_new_tokens, len(seq.block_table) + len(prefix_hits))
        if need > self.num_free_blocks - reviving:
            return False
        for b in prefix_hits:
            self._acquire(b)
        seq.block_table.extend(prefix_hits)
        seq.num_computed_tokens += len(prefix_hits) * self.block_size
        seq.num_cached_tokens = max(seq.num_cached_tokens, len(prefix_hits) * self.block_size)
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks ``allocate(seq, num_new_tokens)`` takes (without prefix hits)."""
        return self._new_blocks(seq.num_computed_tokens + num_new_tokens, len(seq.block_table))

    def _new_blocks(self, num_tokens: int, held: int) -> int:
        """Blocks to add to ``held`` ones for ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - held)

    def commit_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that the first ``num_tokens`` tokens fill, for later reuse."""
        num_full = num_tokens // self.block_size
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            # A twin computed concurrently may already own this hash; keep the first.
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; cached full blocks stay reusable until evicted."""
        self._unref(seq.block_table)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Take back the last ``num_tokens`` computed tokens of ``seq`` (rejected drafts).

        ``num_computed_tokens`` goes back, blocks left holding none of the sequence's tokens
        are returned, and the block it now ends inside, whose tail it will rewrite, leaves the
        prefix cache. A block another sequence also holds is never rewritten: rolling back
        into one raises, before anything changes.
        """
        self.rewind(seq, num_tokens)
        self.trim(seq)

    def rewind(self, seq: Sequence, num_tokens: int) -> None:
        """``rollback`` that keeps every block: for drafted steps still in flight, whose
        slots (and their successors', staged on the device) point into blocks past the new
        end. ``trim`` returns those blocks once nothing in flight can write them."""
        computed = seq.num_computed_tokens
        if not 0 <= num_tokens <= computed:
            raise ValueError(
                f"num_tokens must be between 0 and the {computed} computed tokens, got {num_tokens}"
            )
        keep = computed - num_tokens
        num_kept_blocks, tail = -(-keep // self.block_size), keep % self.block_size
        if tail and self.blocks[seq.block_table[num_kept_blocks - 1]].ref_count > 1:
            raise ValueError(
                f"cannot roll back to token {keep}: it is inside a block shared with another "
                "sequence"
            )
        if tail:
            self._forget(self.blocks[seq.block_table[num_kept_blocks - 1]])
        full = keep // self.block_size
        seq.num_registered_blocks = min(seq.num_registered_blocks, full)
        del seq.block_hashes[full:]  # hashes of tokens that the caller may change
        seq.num_computed_tokens = keep

    def trim(self, seq: Sequence) -> None:
        """Return the blocks of ``seq`` past its computed tokens (``rewind``'s reserve)."""
        num_kept_blocks = -(-seq.num_computed_tokens // self.block_size)
        self._unref(seq.block_table[num_kept_blocks:])  # their KV still matches their hashes
        del seq.block_table[num_kept_blocks:]

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds."""
        for block_id in list(self.free_queue):
            self._forget(self.blocks[block_id])

    def _unref(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block no sequence holds joins the free queue,
        at its back while it is cached, at its front (reused first) when it is not."""
        # Tail blocks are the least shareable, so queue them for eviction before the head.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self.free_queue[block_id] = None
            if block.hash is None or not self.enable_prefix_caching:
                self._forget(block)
                self.free_queue.move_to_end(block_id, last=False)

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash = None

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block_id

    def _full_block_hashes(self, seq: Sequence, num_full: int) -> list[bytes]:
        hashes = seq.block_hashes
        tokens = seq.token_ids
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(
                block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            )
        return hashes[:num_full]
