"""One step that verifies draft trees: every node attends to its sequence's context and its
own ancestors only, at the rotary position of its depth, so each node's logits are those of
plain one-token steps along its path; after acceptance the accepted path's KV, moved to
consecutive slots, is plain decoding's KV, and the step after it gives plain decoding's logits."""

from __future__ import annotations

import random

import pytest
import torch
from test_multi_token_step import _finish, _one_token_at_a_time, _run, _start

from parallm import LLM
from parallm.engine.request import Sequence
from parallm.engine.spec.tree import DraftTree
from parallm.sampling_params import SamplingParams

# (context length, parents): trees whose nodes cross block boundaries (16), with branches at
# the root and deeper, and a sequence without drafts in the same step.
CASES = [
    (37, [-1, -1, 0, 0, 1, 2, 2, 5]),
    (16, [-1, 0, 0, 1, 3]),
    (5, [-1, -1, -1]),
    (20, []),
    (30, [-1, 0, 1, 0, 3, -1, 5, 6, 7, 8, 9, 10, 11, 12]),
]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama3")), dtype="float32", device="cpu", max_model_len=256,
               enable_prefix_caching=False, kv_cache_memory=8 << 20)  # fmt: skip


@pytest.fixture
def tokens(ordinary_token_ids):
    rng = random.Random(11)
    return lambda n: rng.choices(ordinary_token_ids, k=n)


def _path(tree: DraftTree, node: int) -> list[int]:
    """Tokens from the root to ``node``."""
    path = []
    while node >= 0:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


def _leaves(tree: DraftTree) -> list[int]:
    return [i for i in range(len(tree)) if i not in tree.parents]


def test_tree_nodes_get_the_logits_of_one_token_steps_along_their_path(llm, tokens):
    engine = llm.engine
    prompts = [tokens(n) for n, _ in CASES]
    first = tokens(len(CASES))
    trees = [DraftTree(tuple(tokens(len(p))), tuple(p)) for _, p in CASES]
    seqs = _start(engine, prompts, first)
    for seq, tree in zip(seqs, trees, strict=True):
        seq.draft_token_ids, seq.draft_tree = list(tree.tokens), tree
    batch, inputs, logits = _run(engine)
    assert [item.draft_tree for item in batch.seqs] == [t if len(t) else None for t in trees]
    # Nodes sit in consecutive slots after the last known token, at position base + depth.
    offset = 0
    for (n, _), tree in zip(CASES, trees, strict=True):
        rows = slice(offset, offset + 1 + len(tree))
        assert inputs.positions[rows].tolist() == [n, *(n + d for d in tree.depths)]
        slots = inputs.slot_mapping[rows]
        assert len(set(slots.tolist())) == len(slots)
        offset += 1 + len(tree)
    _finish(engine, seqs)

    offset = 0
    for b, tree in enumerate(trees):
        leaves = _leaves(tree) or [None]
        for leaf in leaves:
            fed = [] if leaf is None else _path(tree, leaf)
            reference = _one_token_at_a_time(engine, [prompts[b]], [first[b]], [fed])[0]
            nodes = [] if leaf is None else _ancestors(tree, leaf)
            got = logits[[offset] + [offset + 1 + i for i in nodes]]
            # Batched and one-row GEMMs round differently, and the tree step's softmax runs
            # over more (masked) keys: float32 rounding, far below a wrong mask's effect.
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
        offset += 1 + len(tree)


def _ancestors(tree: DraftTree, node: int) -> list[int]:
    chain = []
    while node >= 0:
        chain.append(node)
        node = tree.parents[node]
    return chain[::-1]


def _greedy_seq(engine, request_id: str, prompt: list[int]) -> Sequence:
    seq = Sequence(request_id, 0, prompt, SamplingParams(temperature=0), arrival_time=0.0)
    engine.scheduler.add(seq)
    return seq


def test_accepted_path_kv_is_plain_decodings_and_so_are_the_next_logits(llm, tokens):
    """Decoys before the right child at every level: the accepted nodes are 1, 4, 6, not the
    first nodes, so their KV moves; then the KV of every computed position equals a plain
    prefill's of the same tokens, and the next decode step's logits equal plain decoding's."""
    engine = llm.engine
    prompt = tokens(29)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)[0]
    future = list(out.outputs[0].token_ids)
    decoy = [(t + 1) % 50 for t in future]
    tree = DraftTree(
        (decoy[1], future[1], decoy[2], decoy[1], future[2], decoy[3], future[3], decoy[4]),
        (-1, -1, 0, 1, 1, 4, 4, 6),
    )
    seq = _greedy_seq(engine, "tree", prompt)
    batch = engine.scheduler.schedule()
    seq.append_token(engine.runner.execute(batch)[0].token_ids.tolist()[0])
    assert seq.output_token_ids == future[:1]
    seq.draft_token_ids, seq.draft_tree = list(tree.tokens), tree
    batch = engine.scheduler.schedule()
    result, _ = engine.runner.execute(batch)
    emitted = result.spec_token_ids[0]
    assert emitted == future[1:5]  # three accepted nodes and the token after them
    for token in emitted:
        seq.append_token(token)
    engine.kv.rollback(seq, len(tree) - (len(emitted) - 1))
    computed = seq.num_computed_tokens
    assert computed == seq.num_tokens - 1

    # One step: the tree sequence's next decode, and a plain prefill of the same tokens.
    plain = _greedy_seq(engine, "plain", seq.token_ids[:computed])
    batch, _, logits = _run(engine)
    assert [item.seq for item in batch.seqs] == [seq, plain]
    for cache in engine.runner.kv_caches:
        flat = cache.view(2, -1, *cache.shape[-2:])
        got, want = (flat[:, _slots(engine, s, computed)] for s in (seq, plain))
        torch.testing.assert_close(got, want)
    engine.scheduler.finish(plain)
    engine.scheduler.finish(seq)
    reference = _one_token_at_a_time(engine, [prompt], [future[0]], [emitted])[0]
    torch.testing.assert_close(logits[0], reference[-1], rtol=1e-4, atol=1e-4)
    _finish(engine, [])


def _slots(engine, seq: Sequence, num_tokens: int) -> torch.Tensor:
    bs = engine.kv.block_size
    positions = torch.arange(num_tokens)
    table = torch.tensor(seq.block_table)
    return table[positions // bs] * bs + positions % bs
