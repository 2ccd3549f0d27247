"""Verify graphs (engine/verify_graph.py) on CPU, run without capture: the shapes they bucket
steps into, and their static buffers run through the same forward give the eager verify
step's logits, hidden states and, end to end, its tokens (chains and Medusa trees, padded
batches), without touching any live KV entry."""

from __future__ import annotations

import random
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from interpreted_engine import run_interpreted
from test_medusa_drafter import _heads_dir
from test_multi_token_step import _finish, _run, _start
from test_speculative import ENGINE, SPEC, _repetitive_prompts, _tokens, oracle_drafts

from parallm import LLM, SamplingParams
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.tree import DraftTree
from parallm.engine.step_inputs import StepInputs
from parallm.engine.verify_graph import VerifyShape, drafter_shapes, verify_shapes

SIZES = [1, 2, 4, 8]


def test_shapes_bucket_batch_sizes_and_tokens_per_sequence():
    shapes = verify_shapes([1, 2, 4, 8, 16], chain_drafts=3, max_batch=8)
    assert {(s.batch, s.tokens_per_seq, s.tree) for s in shapes} == {
        (b, q, False) for b in (1, 2, 4, 8) for q in (2, 3, 4)
    }
    # Largest first (capture shares the first one's memory pool).
    assert [s.num_tokens for s in shapes] == sorted((s.num_tokens for s in shapes), reverse=True)
    capped = verify_shapes([1, 2, 4, 8], chain_drafts=3, tree_nodes=12, max_tokens=16)
    assert all(s.num_tokens <= 16 for s in capped)
    assert VerifyShape(1, 13, True) in capped and VerifyShape(2, 13, True) not in capped
    assert VerifyShape(4, 4, False) in capped and VerifyShape(8, 2, False) in capped


def _drafter(spec: dict, paths=None):
    return SimpleNamespace(config=SpeculativeConfig.from_value(spec),
                           model=SimpleNamespace(paths=paths))  # fmt: skip


def test_drafter_shapes_follow_the_method():
    ngram = _drafter({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 4})
    assert {(s.batch, s.tokens_per_seq, s.tree) for s in drafter_shapes(ngram, SIZES)} == {
        (b, q, False) for b in (1, 2, 4) for q in (2, 3, 4, 5)
    }
    tree = ((0,), (1,), (0, 0), (1, 0), (0, 0, 0))
    medusa = _drafter(
        {"method": "medusa", "model": "heads", "num_speculative_tokens": 3}, paths=tree
    )
    assert {(s.batch, s.tokens_per_seq, s.tree) for s in drafter_shapes(medusa, SIZES)} == {
        (b, 6, True) for b in SIZES
    }
    chain = _drafter({"method": "medusa", "model": "heads", "num_speculative_tokens": 3},
                     paths=((0,), (0, 0), (0, 0, 0)))  # fmt: skip
    assert {s.tree for s in drafter_shapes(chain, SIZES)} == {False}


@pytest.mark.parametrize(("limit", "batches"), [(3, {1, 2, 4}), (4, {1, 2, 4}), (5, {1, 2, 4, 8})])
def test_a_limit_between_graph_sizes_still_gets_a_graph_for_every_drafted_batch(limit, batches):
    """Drafted batches of up to disable_by_batch_size sequences pad to the smallest captured
    size that holds them, so that size is captured too, and none larger."""
    spec = {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": limit}
    assert {s.batch for s in drafter_shapes(_drafter(spec), [1, 2, 4, 8, 16])} == batches
    few = drafter_shapes(_drafter(spec), [1, 2])  # no size holds the limit: all of them
    assert {s.batch for s in few} == {1, 2}
    assert drafter_shapes(_drafter(spec), iter([1, 2, 4, 8, 16])) == drafter_shapes(
        _drafter(spec), [1, 2, 4, 8, 16]
    )


def _step(query_lens: list[int], sampling_rows: int | None = None, width: int = 2) -> StepInputs:
    ends = np.cumsum(query_lens)
    tokens = int(ends[-1])
    rows = np.arange(tokens if sampling_rows is None else sampling_rows, dtype=np.int64)
    return StepInputs(
        input_ids=np.zeros(tokens, np.int64), positions=np.zeros(tokens, np.int64),
        slot_mapping=np.zeros(tokens, np.int64),
        query_start_loc=np.concatenate([[0], ends]).astype(np.int32),
        seq_lens=np.full(len(query_lens), 40, np.int32),
        block_tables=np.zeros((len(query_lens), width), np.int32), sample_indices=rows,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama3")), dtype="float32", device="cpu", max_model_len=256,
               enable_prefix_caching=False, kv_cache_memory=8 << 20)  # fmt: skip


def _install(engine, shapes: list[VerifyShape]):
    engine.runner.capture_verify_graphs(shapes, engine.max_model_len, capture=False)
    return engine.runner.verify_graphs


def test_a_step_goes_to_the_smallest_shape_that_holds_it(llm):
    graphs = _install(llm.engine, verify_shapes(SIZES, chain_drafts=4))
    try:
        assert graphs.shape_for(_step([5, 5, 5])) == VerifyShape(4, 5, False)
        assert graphs.shape_for(_step([2])) == VerifyShape(1, 2, False)
        assert graphs.shape_for(_step([5] * 9)) is None  # more sequences than any shape
        assert graphs.shape_for(_step([5, 1, 3])) == VerifyShape(4, 5, False)  # short chains pad
        assert graphs.shape_for(_step([6, 6])) is None  # more drafts than captured
        assert graphs.shape_for(_step([1, 1])) is None  # a plain decode step
        assert graphs.shape_for(_step([5, 5], sampling_rows=6)) is None  # a prompt chunk's rows
        assert graphs.shape_for(_step([5], width=graphs.max_blocks + 1)) is None
        tree = _step([5, 5])
        tree.tree_num_nodes, tree.tree_visible = np.full(2, 4, np.int32), np.ones(10, np.int64)
        assert graphs.shape_for(tree) is None  # no tree shape captured
        graphs.sizes[(5, True)] = [4]
        assert graphs.shape_for(tree) == VerifyShape(4, 5, True)
        tree = _step([5, 3])
        tree.tree_num_nodes, tree.tree_visible = np.array([4, 2], np.int32), np.ones(8, np.int64)
        assert graphs.shape_for(tree) is None  # trees are not padded
    finally:
        llm.engine.runner.verify_graphs = None


# (context length, draft tree parents or a chain length): three sequences, padded to four;
# shorter chains padded to the longest (a sequence without drafts too).
CHAINS = [(37, 3), (16, 1), (5, 0)]
TREES = [(37, [-1, -1, 0, 0, 1]), (16, [-1, 0, 0, 1, 3]), (20, [-1, -1, -1, 1, 2])]


@pytest.mark.parametrize("cases", [CHAINS, TREES], ids=["chains", "trees"])
def test_the_buffers_give_the_eager_steps_logits_and_leave_live_kv_alone(llm, cases,
                                                                         ordinary_token_ids):  # fmt: skip
    engine, rng = llm.engine, random.Random(3)
    tokens = lambda n: rng.choices(ordinary_token_ids, k=n)  # noqa: E731
    seqs = _start(engine, [tokens(n) for n, _ in cases], tokens(len(cases)))
    for seq, (_, drafts) in zip(seqs, cases, strict=True):
        if isinstance(drafts, int):
            seq.draft_token_ids = tokens(drafts)
        else:
            tree = DraftTree(tuple(tokens(len(drafts))), tuple(drafts))
            seq.draft_token_ids, seq.draft_tree = list(tree.tokens), tree
    batch, inputs, eager = _run(engine)
    with torch.inference_mode():
        _, _, eager_hidden = engine.runner._forward(inputs, None, [])
    q = 1 + max(len(item.draft_token_ids) for item in batch.seqs)
    graphs = _install(engine, [VerifyShape(4, q, cases is TREES)])
    try:
        owned = {b for seq in seqs for b in seq.block_table}
        before = [cache.clone() for cache in engine.runner.kv_caches]
        logits, hidden = graphs.run(inputs)
        assert graphs.num_replays == 1 and logits.shape == eager.shape
        torch.testing.assert_close(logits.float(), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, eager_hidden, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), eager.argmax(-1))
        scratch = engine.runner.cache_cfg.num_blocks
        for old, new in zip(before, engine.runner.kv_caches, strict=True):
            others = [b for b in range(old.shape[1]) if b not in owned and b != scratch]
            assert torch.equal(old[:, others], new[:, others])  # padding wrote the scratch only
            torch.testing.assert_close(old[:, sorted(owned)], new[:, sorted(owned)])
    finally:
        engine.runner.verify_graphs = None
        _finish(engine, seqs)
    assert batch.seqs and any(item.draft_token_ids for item in batch.seqs)


def _spec_tokens(path, spec, prompts, params, graphs: bool, **engine_args):
    llm = LLM(path, speculative_config=spec, **{**ENGINE, **engine_args})
    replays = None
    if graphs:
        cfg = llm.engine.config
        shapes = drafter_shapes(llm.engine.drafter, SIZES, cfg.max_num_batched_tokens)
        replays = _install(llm.engine, shapes)
    free = llm.engine.kv.num_free_blocks
    out = [_tokens(llm, prompts, p) for p in params]
    assert llm.engine.kv.num_free_blocks == free
    return out, llm.engine.stats, replays


PARAMS = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
          SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=7, n=2)]  # fmt: skip


def test_chain_verify_through_the_buffers_gives_the_eager_tokens(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    plain = LLM(path, **ENGINE)
    future = {tuple(p): out[0] for p, out in zip(prompts, _tokens(plain, prompts, PARAMS[0]),
                                                   strict=True)}  # fmt: skip
    oracle_drafts(monkeypatch, future)  # four drafts a step, the third wrong
    eager, eager_stats, _ = _spec_tokens(path, SPEC, prompts, PARAMS, graphs=False)
    graph, graph_stats, graphs = _spec_tokens(path, SPEC, prompts, PARAMS, graphs=True)
    assert graph == eager == [_tokens(plain, prompts, p) for p in PARAMS]
    assert graphs.num_replays > 0
    assert graph_stats["spec_accepted_tokens"] == eager_stats["spec_accepted_tokens"] > 0


def test_medusa_tree_verify_through_the_buffers_gives_the_eager_tokens_and_hidden_states(
    tiny_model_dir, ordinary_token_ids, tmp_path
):
    path = str(tiny_model_dir("llama3"))
    plain = LLM(path, **ENGINE)
    spec = {"method": "medusa", "model": _heads_dir(tmp_path, plain), "num_speculative_tokens": 2}
    prompts = _repetitive_prompts(ordinary_token_ids)[:3]
    wide = dict(max_num_batched_tokens=256)  # room for whole trees of three sequences
    eager, eager_stats, _ = _spec_tokens(path, spec, prompts, PARAMS, False, **wide)
    graph, graph_stats, graphs = _spec_tokens(path, spec, prompts, PARAMS, True, **wide)
    assert graph == eager == [_tokens(plain, prompts, p) for p in PARAMS]
    assert graphs.num_replays > 0 and all(s.tree for s in graphs.shapes)
    # The heads read the graph's hidden states: the same drafts, so the same acceptance.
    assert graph_stats["spec_draft_tokens"] == eager_stats["spec_draft_tokens"]
    assert graph_stats["spec_accepted_tokens"] == eager_stats["spec_accepted_tokens"] > 0


def test_greedy_drafts_are_checked_from_one_argmax_not_a_sampler_call_each(
    tiny_model_dir, ordinary_token_ids, monkeypatch, tmp_path
):
    """A verify step's greedy rows come to the host in one copy (no sampler call and host sync
    per draft); sampled requests keep sampling each position; tokens stay plain decoding's."""
    from parallm.engine.spec.verify import DraftVerifier

    calls = []
    sample_row = DraftVerifier._sample_row
    monkeypatch.setattr(DraftVerifier, "_sample_row",
                        lambda self, seq, row: calls.append(seq.params) or sample_row(self, seq, row))  # fmt: skip
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    plain = LLM(path, **ENGINE)
    heads = _heads_dir(tmp_path, plain)
    for spec in (SPEC, {"method": "medusa", "model": heads, "num_speculative_tokens": 2}):
        llm = LLM(path, speculative_config=spec, **ENGINE)
        for params in PARAMS:
            calls.clear()
            assert _tokens(llm, prompts, params) == _tokens(plain, prompts, params)
            assert bool(calls) == (params.temperature > 0), spec["method"]
        assert llm.engine.spec_stats.accepted_tokens > 0


_INTERPRETED = textwrap.dedent(
    """
    import sys
    import triton_interpreter  # before triton: lists its builtins once (speed)
    from parallm import LLM, SamplingParams
    from parallm.engine.spec import drafting
    from parallm.engine.spec.tree import DraftTree
    from parallm.engine.verify_graph import drafter_shapes
    from parallm.kernels import paged_prefill
    from parallm.layers.backends import TritonAttention

    tree = sys.argv[2] == "tree"
    prefill_calls = []
    prefill = paged_prefill.paged_prefill_attention
    def counted(*args, **kwargs):
        prefill_calls.append(kwargs.get("tree_num_nodes") is not None)
        return prefill(*args, **kwargs)
    paged_prefill.paged_prefill_attention = counted

    prompts = [[5 + i for i in range(n)] for n in (3, 20, 9)]  # three sequences: one pad row
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    engine = dict(device="cpu", max_model_len=128)
    plain = LLM(sys.argv[1], **engine)
    future = {tuple(p): o.outputs[0].token_ids
              for p, o in zip(prompts, plain.generate(
                  [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))}

    def propose(self, running):  # plain decoding's next tokens, as a chain or in a tree
        for seq in running:
            if not drafting.draftable(seq) or seq.num_output_tokens + 4 > 7:
                continue
            ahead = list(future[tuple(seq.prompt_token_ids)][seq.num_output_tokens:])
            if tree:  # nodes 0 and 2 on the right path, 1 and 3 off it
                draft = DraftTree((ahead[0], ahead[0] + 1, ahead[1], 3), (-1, -1, 0, 1))
                seq.draft_token_ids, seq.draft_tree = list(draft.tokens), draft
            else:  # chains of 1 to 3 drafts in one step: the shorter ones padded
                seq.draft_token_ids = ahead[: 1 + len(seq.prompt_token_ids) % 3]
    drafting.Drafter.propose = propose
    spec = {"method": "ngram", "num_speculative_tokens": 4 if tree else 3}
    llm = LLM(sys.argv[1], speculative_config=spec, **engine)
    runner = llm.engine.runner
    runner.backend = TritonAttention()  # what CUDA gets; the interpreter runs its kernels
    shapes = drafter_shapes(llm.engine.drafter, [1, 2, 4])
    if tree:
        from parallm.engine.verify_graph import VerifyShape
        shapes = [VerifyShape(4, 5, True)]
    runner.capture_verify_graphs(shapes, llm.engine.max_model_len, capture=False)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [future[tuple(p)] for p in prompts]
    graphs = runner.verify_graphs
    assert graphs.num_replays >= 1, graphs.num_replays
    assert llm.engine.spec_stats.accepted_tokens > 0
    assert any(prefill_calls) == tree, prefill_calls
    print("verify ok", graphs.num_replays)
    """
)


@pytest.mark.parametrize("drafts", ["chain", "tree"])
def test_the_buffers_run_the_triton_kernels_to_plain_decodings_tokens(tiny_model_dir, drafts):
    """Under the Triton interpreter: the static buffers (full-width tables, a padding sequence
    at the scratch block, tree bitmasks) through the Triton rotary/store and prefill kernels."""
    out = run_interpreted(_INTERPRETED, str(tiny_model_dir("llama3")), drafts, timeout=600)
    assert "verify ok" in out


def test_capture_shares_one_pair_of_output_buffers(llm, fake_graph_capture):
    """capture()'s bookkeeping on CPU, the CUDA calls faked: largest shape first, and every
    graph's outputs are views of the same two buffers sized by the largest shape."""
    pools = fake_graph_capture
    engine = llm.engine
    shapes = verify_shapes([1, 2, 4], chain_drafts=3)
    try:
        graphs = _install(engine, shapes)
        graphs.capture()
        assert pools == [None] + ["pool"] * (len(shapes) - 1)
        largest = max(shapes, key=lambda s: s.num_tokens)
        logits_buf, rows_buf = graphs._shared_outputs
        assert logits_buf.shape[0] == rows_buf.shape[0] == largest.num_tokens
        for shape in shapes:
            logits, rows = graphs.outputs[shape]
            assert logits.shape[0] == rows.shape[0] == shape.num_tokens
            assert logits.data_ptr() == logits_buf.data_ptr()
            assert rows.data_ptr() == rows_buf.data_ptr()
    finally:
        engine.runner.verify_graphs = None


def _fake_decode_graphs(self, max_num_seqs):
    """The decode graphs' capture, faked on CPU: sizes 8 and 16, none run."""
    self.runner.graphs = SimpleNamespace(sizes=[8, 16])
    return 0.0


def test_no_verify_shape_fits_and_the_engine_still_starts(tiny_model_dir, monkeypatch):
    """No graph size's drafted tokens fit the step's token budget, so no verify shape: the
    engine starts without verify graphs (drafted steps run eagerly) instead of refusing."""
    from parallm.engine.engine import LLMEngine

    monkeypatch.setattr(LLMEngine, "_graph_sizes", lambda self, max_num_seqs: [8, 16])
    monkeypatch.setattr(LLMEngine, "_capture_graphs", _fake_decode_graphs)
    spec = {"method": "ngram", "num_speculative_tokens": 2}
    llm = LLM(str(tiny_model_dir("llama3")), device="cpu", speculative_config=spec,
              max_num_batched_tokens=8)  # fmt: skip
    assert llm.engine.runner.verify_graphs is None
