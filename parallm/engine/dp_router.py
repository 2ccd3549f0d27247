"""Prefix-aware routing of requests over data-parallel engine replicas.

Each replica has its own KV cache and prefix cache. The router keeps, per replica, the hashes
of the full prompt blocks it sent there (the same chained block hashes as the replica's
``KVCacheManager``, so equal hashes mean equal prefixes) and the number of requests in flight
there. A request goes to the replica that caches the longest prefix of it, ties (and no hit
at all) to the least loaded one; a replica that is already ``max_imbalance`` requests busier
than the least loaded one takes no request for its cache's sake, so that a prefix every
request shares (a system prompt) cannot pile all of them onto one replica.

Memory is bounded: each replica's hashes form an LRU of ``max_blocks_per_replica`` entries (a
replica's own cache evicts least recently used blocks too, so the router forgets roughly what
the replica forgets).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from parallm.engine.kv_cache import block_hash

# The parent hash of a sequence's first block, as in the KV cache manager.
_ROOT_HASH = b""


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int) -> list[bytes]:
    """Chained hashes of the first ``num_blocks`` full blocks of ``token_ids``."""
    hashes: list[bytes] = []
    parent = _ROOT_HASH
    for i in range(num_blocks):
        parent = block_hash(parent, list(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


@dataclass
class _InFlight:
    replica: int
    prompt_token_ids: list[int]


class PrefixRouter:
    """Picks a replica per request (``route``) and is told when each finishes (``finish``)."""

    def __init__(
        self,
        num_replicas: int,
        block_size: int,
        max_blocks_per_replica: int,
        enable_prefix_caching: bool = True,
        max_imbalance: int | None = 32,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_blocks_per_replica < 0:
            raise ValueError(f"max_blocks_per_replica must be >= 0, got {max_blocks_per_replica}")
        if max_imbalance is not None and max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0 or None, got {max_imbalance}")
        self.block_size = block_size
        self.max_blocks_per_replica = max_blocks_per_replica
        self.enable_prefix_caching = enable_prefix_caching
        self.max_imbalance = max_imbalance
        # Per replica, its cached block hashes; the end is the most recently used.
        self.cached: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.load = [0] * num_replicas  # requests in flight per replica
        self.inflight: dict[str, _InFlight] = {}

    @property
    def num_replicas(self) -> int:
        return len(self.load)

    def route(self, request_id: str, prompt_token_ids: Sequence[int]) -> int:
        """The replica for a new request; counts it in flight there and records that the
        replica will cache its prompt's full blocks."""
        if request_id in self.inflight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        # As the cache manager looks up: the last token is always computed, so at most the
        # blocks before it can hit.
        hashes = self._hashes(prompt_token_ids, (len(prompt_token_ids) - 1) // self.block_size)
        replica = self._pick(hashes)
        self.load[replica] += 1
        self.inflight[request_id] = _InFlight(replica, list(prompt_token_ids))
        self._remember(replica, prompt_token_ids)
        return replica

    def finish(self, request_id: str, token_ids: Sequence[int] | None = None) -> None:
        """A request finished or was aborted: it no longer loads its replica. ``token_ids``
        (prompt and output of a sample) records the blocks its output filled as cached there
        too, for a follow-up that extends it (the next turn of a chat). Unknown ids (already
        finished) are ignored."""
        done = self.inflight.pop(request_id, None)
        if done is None:
            return
        self.load[done.replica] -= 1
        if token_ids is not None:
            self._remember(done.replica, token_ids)

    def reset_prefix_cache(self) -> None:
        """The replicas forgot their cached prefixes: forget them here too (loads stay)."""
        for cached in self.cached:
            cached.clear()

    def matched_blocks(self, replica: int, prompt_token_ids: Sequence[int]) -> int:
        """How many leading full blocks of a prompt the router believes ``replica`` caches."""
        hashes = self._hashes(prompt_token_ids, (len(prompt_token_ids) - 1) // self.block_size)
        return self._match(self.cached[replica], hashes)

    def _pick(self, hashes: list[bytes]) -> int:
        least = min(self.load)
        best, best_key = 0, None
        for replica, load in enumerate(self.load):
            if self.max_imbalance is not None and load > least + self.max_imbalance:
                continue
            # Longest prefix first, then the least loaded, then the lowest index.
            key = (-self._match(self.cached[replica], hashes), load, replica)
            if best_key is None or key < best_key:
                best, best_key = replica, key
        return best

    @staticmethod
    def _match(cached: OrderedDict[bytes, None], hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def _remember(self, replica: int, token_ids: Sequence[int]) -> None:
        cached = self.cached[replica]
        for h in self._hashes(token_ids, len(token_ids) // self.block_size):
            cached[h] = None
            cached.move_to_end(h)
        while len(cached) > self.max_blocks_per_replica:
            cached.popitem(last=False)

    def _hashes(self, token_ids: Sequence[int], num_blocks: int) -> list[bytes]:
        if not self.enable_prefix_caching:
            return []
        # Blocks beyond what a replica can hold can never all be cached at once.
        return prefix_block_hashes(
            token_ids, self.block_size, min(num_blocks, self.max_blocks_per_replica)
        )
