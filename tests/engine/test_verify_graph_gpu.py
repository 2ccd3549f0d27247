"""Verify graphs on CUDA: replayed verify steps give the tokens and acceptance of the same static
buffers run uncaptured (greedy; chains of 1 to 4 drafts and a Medusa tree; batch 1 and 8; bf16
and fp16), so only capture and replay are under test: both runs pad a batch whose sequences
finished at different steps to the same shape and start from an empty prefix cache, so they run
the same kernels on the same rows. The buffers' layout against the eager verify step is checked
on CPU (tests/engine/test_verify_graph.py) and here by logits in the no-sync test, which also
checks that a replay makes no host synchronisation."""

from __future__ import annotations

import random

import pytest
import torch
from test_medusa_drafter import _heads_dir
from test_multi_token_step import _finish, _run, _start

from parallm import LLM, SamplingParams
from parallm.engine.spec import drafting
from parallm.engine.spec.tree import DraftTree
from parallm.engine.verify_graph import VerifyShape

pytestmark = pytest.mark.gpu

GRAPH_SIZES = (1, 8)
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _llm(path: str, dtype: str, spec: dict) -> LLM:
    # No prefix caching: a later run's prompts would hit the blocks an earlier run cached and
    # compute fewer prefill rows, whose half-precision rounding may differ.
    return LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20,
               cuda_graph_sizes=GRAPH_SIZES, speculative_config=spec,
               enable_prefix_caching=False)  # fmt: skip


def _prompts(ordinary_token_ids: list[int], batch: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [rng.choices(ordinary_token_ids, k=rng.randint(5, 60)) for _ in range(batch)]


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _graph_and_uncaptured(llm: LLM, prompts: list[list[int]]):
    """Tokens and acceptance with the verify graphs, then with the same shapes' static buffers
    run uncaptured (``capture=False``) on the same engine."""
    engine, runner = llm.engine, llm.engine.runner
    graphs = runner.verify_graphs
    assert graphs is not None and graphs.graphs
    replayed = _run_through_verify_buffers(llm, prompts)
    runner.capture_verify_graphs(graphs.shapes, engine.max_model_len, capture=False)
    assert not runner.verify_graphs.captures
    try:
        uncaptured = _run_through_verify_buffers(llm, prompts)
    finally:
        runner.verify_graphs = graphs
    return replayed, uncaptured


def _run_through_verify_buffers(llm: LLM, prompts: list[list[int]]):
    """Tokens and accepted drafts of one run, some of whose steps went through the runner's
    verify buffers."""
    engine = llm.engine
    buffers = engine.runner.verify_graphs
    replays, accepted = buffers.num_replays, engine.spec_stats.accepted_tokens
    tokens = _tokens(llm, prompts)
    assert buffers.num_replays > replays
    return tokens, engine.spec_stats.accepted_tokens - accepted


def _oracle(monkeypatch, future: dict[tuple[int, ...], list[int]], k: int) -> None:
    """Draft plain decoding's next ``k`` tokens, the last one wrong every third step (partial
    acceptance), in steps where every sequence can take ``k`` drafts, else none: every
    drafted step is a uniform verify step, which a graph of its batch size holds."""

    def propose(self, running):
        room = [seq.num_output_tokens + k + 1 <= GREEDY.max_tokens for seq in running]
        if not running or not all(room) or not all(map(drafting.draftable, running)):
            return
        for seq in running:
            done = seq.num_output_tokens
            drafts = list(future[tuple(seq.prompt_token_ids)][done : done + k])
            if done % 3 == 0:
                drafts[-1] = (drafts[-1] + 1) % 50
            seq.draft_token_ids = drafts

    monkeypatch.setattr(drafting.Drafter, "propose", propose)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_verify_gives_the_uncaptured_buffers_tokens_for_chains(
    tiny_model_dir, ordinary_token_ids, monkeypatch, dtype, k, batch
):
    # No ring of earlier requests: the second run would draft from the first's sequences,
    # and acceptance would differ between the runs with the same tokens.
    llm = _llm(str(tiny_model_dir("llama3")), dtype, {"method": "ngram",
                                                       "num_speculative_tokens": k,
                                                       "prompt_lookup_history_tokens": 0})  # fmt: skip
    shapes = set(llm.engine.runner.verify_graphs.graphs)
    assert {VerifyShape(b, 1 + d, False) for b in GRAPH_SIZES for d in range(1, k + 1)} == shapes
    prompts = _prompts(ordinary_token_ids, batch)
    monkeypatch.setattr(drafting.Drafter, "propose", lambda self, running: None)
    plain = _tokens(llm, prompts)
    _oracle(monkeypatch, {tuple(p): t for p, t in zip(prompts, plain, strict=True)}, k)
    graph, uncaptured = _graph_and_uncaptured(llm, prompts)
    assert graph == uncaptured
    assert graph[1] > 0


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_verify_gives_the_uncaptured_buffers_tokens_for_a_medusa_tree(
    tiny_model_dir, ordinary_token_ids, tmp_path, dtype, batch
):
    path = str(tiny_model_dir("llama3"))
    heads = _heads_dir(tmp_path, LLM(path, dtype="float32", device="cpu"))
    llm = _llm(path, dtype, {"method": "medusa", "model": heads, "num_speculative_tokens": 3})
    assert all(shape.tree for shape in llm.engine.runner.verify_graphs.graphs)
    graph, uncaptured = _graph_and_uncaptured(llm, _prompts(ordinary_token_ids, batch))
    assert graph == uncaptured  # tokens, and acceptance: the heads read the same hidden states
    assert graph[1] > 0


@pytest.mark.parametrize("drafts", ["chains", "padded chains", "tree"])
def test_a_verify_replay_makes_no_host_sync(tiny_model_dir, ordinary_token_ids, tmp_path, drafts):
    """Also the eager step's logits, with chains of one length, of lengths 0 to 3 (shorter ones
    padded inside the graph), and draft trees."""
    path, tree = str(tiny_model_dir("llama3")), drafts == "tree"
    if tree:
        heads = _heads_dir(tmp_path, LLM(path, dtype="float32", device="cpu"))
        spec = {"method": "medusa", "model": heads, "num_speculative_tokens": 2,
                "speculative_token_tree": [(0,), (1,), (0, 0), (1, 0)]}  # fmt: skip
    else:
        spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = _llm(path, "bfloat16", spec)
    engine, rng = llm.engine, random.Random(5)
    seqs = _start(engine, _prompts(ordinary_token_ids, 8), rng.choices(ordinary_token_ids, k=8))
    for i, seq in enumerate(seqs):
        if tree:
            draft = DraftTree(tuple(rng.choices(ordinary_token_ids, k=4)), (-1, -1, 0, 1))
            seq.draft_token_ids, seq.draft_tree = list(draft.tokens), draft
        else:
            k = 3 if drafts == "chains" or i % 4 == 0 else i % 4 - 1  # padded: 3, 0, 1, 2, ..
            seq.draft_token_ids = rng.choices(ordinary_token_ids, k=k)
    try:
        batch, inputs, eager = _run(engine)
        graphs = engine.runner.verify_graphs
        assert graphs.shape_for(inputs) == VerifyShape(8, 5 if tree else 4, tree)
        graphs.run(inputs)  # staging buffers warm
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits, hidden = graphs.run(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(logits.float(), eager, rtol=2e-2, atol=2e-2)
        assert hidden.shape[0] == logits.shape[0] == eager.shape[0]
    finally:
        _finish(engine, seqs)
