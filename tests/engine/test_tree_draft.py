"""DraftTree: validation, depths, the visibility bitmasks, the acceptance walk, Medusa-style
index paths, truncation, and the KV move of an accepted path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parallm.engine.spec.tree import MAX_TREE_NODES, DraftTree, move_kv_slots

TREE = DraftTree((10, 11, 12, 13, 14, 15), (-1, -1, 0, 0, 2, 1))


def test_depths_and_visibility():
    assert TREE.depths == (1, 1, 2, 2, 3, 2)
    visible = TREE.visible()
    # Node i sees itself and its ancestors only.
    expected = np.zeros((6, 6), dtype=bool)
    for i, ancestors in enumerate([[0], [1], [0, 2], [0, 3], [0, 2, 4], [1, 5]]):
        expected[i, ancestors] = True
    assert (visible == expected).all()
    assert not TREE.is_chain and DraftTree.chain([4, 5, 6]).is_chain
    assert DraftTree.chain([4, 5, 6]).parents == (-1, 0, 1)


def test_a_64_node_chain_uses_the_sign_bit():
    tree = DraftTree.chain(list(range(MAX_TREE_NODES)))
    bits = tree.visible_bits
    assert bits.dtype == np.int64 and bits[-1] == -1  # all 64 bits set
    assert tree.visible().all(axis=1).tolist() == [False] * 63 + [True]
    assert (tree.visible() == np.tri(64, dtype=bool)).all()


@pytest.mark.parametrize(
    ("tokens", "parents", "match"),
    [
        ((1, 2), (-1,), "one parent per token"),
        ((1, 2), (-1, 1), "parents\\[i\\] < i"),
        ((1,), (-2,), "parents\\[i\\] < i"),
        (tuple(range(65)), tuple(range(-1, 64)), "at most 64 nodes"),
    ],
)
def test_bad_trees_are_refused(tokens, parents, match):
    with pytest.raises(ValueError, match=match):
        DraftTree(tokens, parents)


def test_walk_follows_the_sampled_tokens():
    # At the root 11 is sampled (node 1), then 15 (node 5), then 99: no child, stop.
    samples = {1: 15, 5: 99}
    emitted, path = TREE.walk(11, samples.__getitem__)
    assert (emitted, path) == ([11, 15, 99], [1, 5])
    emitted, path = TREE.walk(10, {0: 12, 2: 14, 4: 7}.__getitem__)
    assert (emitted, path) == ([10, 12, 14, 7], [0, 2, 4])
    assert TREE.walk(42, lambda node: pytest.fail("no node accepted")) == ([42], [])


def test_from_paths_orders_nodes_breadth_first():
    tops = {0: [5, 6, 7], 1: [8, 9], 2: [1]}  # per head, its top tokens
    tree = DraftTree.from_paths([(0, 0), (1,), (0,), (0, 1), (0, 0, 0)],
                                lambda head, rank: tops[head][rank])  # fmt: skip
    assert tree.tokens == (5, 6, 8, 9, 1)
    assert tree.parents == (-1, -1, 0, 0, 2)


def test_truncation_keeps_a_tree():
    assert TREE.truncated(3) == DraftTree((10, 11, 12), (-1, -1, 0))
    assert TREE.truncated(10) is TREE


def test_move_kv_slots_reads_all_sources_first():
    cache = torch.arange(2 * 3 * 4 * 1 * 2, dtype=torch.float32).view(2, 3, 4, 1, 2)
    before = cache.view(2, -1, 1, 2).clone()
    # Slot 5 is both a destination and a source: the move reads it before writing it.
    move_kv_slots([cache], torch.tensor([5, 7]), torch.tensor([4, 5]))
    after = cache.view(2, -1, 1, 2)
    assert torch.equal(after[:, 4], before[:, 5]) and torch.equal(after[:, 5], before[:, 7])
    untouched = [i for i in range(12) if i not in (4, 5)]
    assert torch.equal(after[:, untouched], before[:, untouched])
