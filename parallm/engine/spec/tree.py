"""Draft trees: several candidate continuations of one sequence, verified in one step.

A tree's nodes are draft tokens; ``parents[i]`` is the index of node ``i``'s parent, or -1 for
a child of the sequence's last known token. Parents come before their children
(``parents[i] < i``), so any leading slice of the nodes is a tree too (the scheduler cuts
drafts to fit its budget that way). A chain ``t0, t1, ...`` is the tree with parents
``-1, 0, 1, ...``; drafters that propose chains leave ``Sequence.draft_tree`` unset and the
runner keeps its chain path for them.

In a step, the nodes sit in the cache slots after the last known token in node order, at the
rotary positions ``base + depth``, and each attends to the sequence's context and its own
ancestors only (the tree mask, one bitmask of visible nodes per node). Acceptance walks from
the root (:meth:`DraftTree.walk`); the accepted path's KV then moves to consecutive slots
(:func:`move_kv_slots`) and the other nodes are rolled back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Each node's visible nodes are one int64 bitmask (bit j: node j), in the attention kernels too.
MAX_TREE_NODES = 64


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens with parent indices (-1: the sequence's last known token)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"a draft tree needs one parent per token, got {len(self.tokens)} tokens and "
                f"{len(self.parents)} parents"
            )
        if len(self.tokens) > MAX_TREE_NODES:
            raise ValueError(
                f"a draft tree has at most {MAX_TREE_NODES} nodes, got {len(self.tokens)}"
            )
        bad = [i for i, p in enumerate(self.parents) if not -1 <= p < i]
        if bad:
            raise ValueError(
                f"draft tree parents must satisfy -1 <= parents[i] < i, broken at nodes {bad}"
            )

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], token_at: Callable[[int, int], int]):
        """The tree of prefix-closed index ``paths`` (Medusa's form): path ``(r0, .., rd)``
        is the node whose token is ``token_at(d, rd)``, child of the node of ``(r0, ..)``.
        Nodes come in breadth-first order of the sorted paths."""
        ordered = sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(ordered)}
        parents = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in ordered)
        tokens = tuple(token_at(len(p) - 1, p[-1]) for p in ordered)
        return cls(tokens, parents)

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def depths(self) -> tuple[int, ...]:
        """Node ``i``'s distance from the last known token (1 for the root's children)."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return tuple(depths)

    @functools.cached_property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self.parents) - 1))

    @functools.cached_property
    def visible_bits(self) -> np.ndarray:
        """int64 ``[n]``: bit ``j`` of entry ``i`` set when node ``i`` attends to node ``j``
        (its ancestors and itself). Bit 63 is the sign bit, which the masks read as a bit."""
        bits: list[int] = []
        for i, p in enumerate(self.parents):
            bits.append((bits[p] if p >= 0 else 0) | (1 << i))
        return np.array([b - (1 << 64) if b >= 1 << 63 else b for b in bits], dtype=np.int64)

    def visible(self) -> np.ndarray:
        """bool ``[n, n]``: node ``i`` attends to node ``j`` (``visible_bits`` unpacked)."""
        n = len(self)
        return ((self.visible_bits[:, None] >> np.arange(n)[None, :]) & 1) == 1

    def truncated(self, num_nodes: int) -> DraftTree:
        """The first ``num_nodes`` nodes (still a tree: parents come first)."""
        if num_nodes >= len(self):
            return self
        return DraftTree(self.tokens[:num_nodes], self.parents[:num_nodes])

    @functools.cached_property
    def _children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents):
            children.setdefault(p, []).append(i)
        return children

    def child_with(self, node: int, token: int) -> int | None:
        """The first child of ``node`` (-1: the root) carrying ``token``, or None."""
        for child in self._children.get(node, ()):
            if self.tokens[child] == token:
                return child
        return None

    def walk(
        self, first_token: int, sample_at: Callable[[int], int]
    ) -> tuple[list[int], list[int]]:
        """Plain decoding's tokens through the tree: ``(emitted, path)``.

        ``first_token`` is the token sampled after the last known token; while a child of the
        current node carries the last sampled token, move to it and sample at it
        (``sample_at(node)``, one draw per emitted token). ``path`` holds the accepted nodes
        in order (``len(emitted) == len(path) + 1``).
        """
        emitted, path, node = [first_token], [], -1
        while (child := self.child_with(node, emitted[-1])) is not None:
            path.append(child)
            emitted.append(sample_at(child))
            node = child
        return emitted, path


def move_kv_slots(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the keys and values at flat slots ``src`` to slots ``dst`` in every layer's cache
    ``[2, blocks, block_size, Hkv, D]``. Reads all sources before writing, so a slot may be
    both a source and a destination."""
    for cache in kv_caches:
        flat = cache.view(2, -1, *cache.shape[-2:])
        flat[:, dst] = flat[:, src]
