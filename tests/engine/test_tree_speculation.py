"""Draft trees verified in one step are lossless: with oracle and random trees, greedy and
seeded sampled output is token-identical to plain decoding (float32, CPU), through chunked
prefill, prefix caching, batches, n > 1, stop strings and min_tokens; accepted paths that are
not the first nodes move their KV, and no KV block leaks."""

from __future__ import annotations

import random

import pytest
from test_speculative import ENGINE, SPEC, _repetitive_prompts, _tokens

from parallm import LLM, SamplingParams
from parallm.engine.spec.tree import DraftTree


def tree_drafts(monkeypatch, future: dict[tuple[int, ...], list[int]], seed: int = 0,
                num_nodes: int = 12) -> None:  # fmt: skip
    """Make the drafter propose random trees in which some children carry plain decoding's
    next token (``future``, by prompt) and the others random tokens; the accepted path's
    nodes are scattered through the tree, not its first nodes."""
    from parallm.engine.spec import drafting

    rng = random.Random(seed)

    def propose(self, running):
        for seq in running:
            if not drafting.draftable(seq):
                continue
            ahead = future[tuple(seq.prompt_token_ids)][seq.num_output_tokens :]
            tokens, parents, depths = [], [], []
            for _ in range(rng.randint(1, num_nodes)):
                parent = rng.randint(-1, len(tokens) - 1)
                depth = 1 if parent < 0 else depths[parent] + 1
                right = ahead[depth - 1] if depth <= len(ahead) else 0
                tokens.append(right if rng.random() < 0.5 else rng.randrange(50))
                parents.append(parent)
                depths.append(depth)
            seq.draft_tree = DraftTree(tuple(tokens), tuple(parents))
            seq.draft_token_ids = tokens

    monkeypatch.setattr(drafting.Drafter, "propose", propose)


def _future(prompts, plain) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): out[0] for p, out in zip(prompts, plain, strict=True)}


@pytest.mark.parametrize(("arch", "temperature"), [("llama3", 0.0), ("qwen3", 0.0), ("qwen2", 0.9)])
def test_random_trees_give_plain_decodings_tokens(
    arch, temperature, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir(arch))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=temperature, max_tokens=30, ignore_eos=True, seed=5)
    plain_llm = LLM(path, **ENGINE)
    plain = _tokens(plain_llm, prompts, params)
    tree_drafts(monkeypatch, _future(prompts, plain))
    llm = LLM(path, speculative_config=SPEC, **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    stats = llm.engine.spec_stats
    assert stats.accepted_tokens > 0
    assert llm.engine.num_steps < plain_llm.engine.num_steps
    assert llm.engine.kv.num_free_blocks == free


def oracle_trees(
    monkeypatch, future: dict[tuple[int, ...], list[int]], depth: int = 4
) -> list[int]:
    """Trees in which, at every level, plain decoding's next token is the last of three
    children, after two wrong ones that have a child each (five nodes a level): the whole
    right path is accepted, through nodes that are never the first ones. Returns the list
    that collects each proposal's number of levels (kept within ``max_tokens``)."""
    from parallm.engine.spec import drafting

    levels: list[int] = []

    def propose(self, running):
        for seq in running:
            if not drafting.draftable(seq):
                continue
            room = (seq.params.max_tokens - seq.num_output_tokens - 1) // 5
            ahead = future[tuple(seq.prompt_token_ids)][seq.num_output_tokens :][: min(depth, room)]
            tokens, parents, parent = [], [], -1
            for right in ahead:
                wrong = [(right + 1) % 50, (right + 2) % 50]
                tokens += [*wrong, right]
                parents += [parent] * 3
                tokens += wrong
                parents += [len(parents) - 3, len(parents) - 2]
                parent = len(parents) - 3
            if tokens:
                seq.draft_tree = DraftTree(tuple(tokens), tuple(parents))
                seq.draft_token_ids = tokens
                levels.append(len(ahead))

    monkeypatch.setattr(drafting.Drafter, "propose", propose)
    return levels


def test_oracle_trees_accept_the_whole_right_path(tiny_model_dir, ordinary_token_ids, monkeypatch):
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine = dict(ENGINE, max_num_batched_tokens=128)  # room for every tree of a step
    plain = _tokens(LLM(path, **engine), prompts, params)
    levels = oracle_trees(monkeypatch, _future(prompts, plain))
    llm = LLM(path, speculative_config=SPEC, **engine)
    assert _tokens(llm, prompts, params) == plain
    stats = llm.engine.spec_stats
    assert stats.num_proposals == len(levels) > 0
    assert stats.accepted_tokens == sum(levels)
    # The scheduler may cut a tree's last nodes (wrong children) to fit a step's budget.
    assert sum(levels) < stats.draft_tokens <= 5 * sum(levels)


def test_stops_limits_samples_and_logprobs_with_trees(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("qwen2"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    cases = [
        SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=12),
        SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, n=2, seed=4),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True),
    ]
    plain_llm = LLM(path, **ENGINE)
    for i, params in enumerate(cases):
        want = plain_llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                  use_tqdm=False)  # fmt: skip
        future = {
            tuple(p): list(o.outputs[0].token_ids) for p, o in zip(prompts, want, strict=True)
        }
        with monkeypatch.context() as m:
            tree_drafts(m, future, seed=i)
            llm = LLM(path, speculative_config=SPEC, **ENGINE)
            got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [
            [c.token_ids for c in o.outputs] for o in want
        ], params
        if params.logprobs:
            for o, w in zip(got, want, strict=True):
                for a, b in zip(o.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
                    assert a.keys() == b.keys()
                    for t in a:
                        assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


def _right_chains(monkeypatch, future: dict[tuple[int, ...], list[int]]) -> None:
    """Chains of plain decoding's next 4 tokens, all right: long accepted runs."""
    from parallm.engine.spec import drafting

    def propose(self, running):
        for seq in running:
            if drafting.draftable(seq):
                done = seq.num_output_tokens
                seq.draft_token_ids = future[tuple(seq.prompt_token_ids)][done : done + 4]

    monkeypatch.setattr(drafting.Drafter, "propose", propose)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_a_stop_string_inside_an_accepted_run_ends_the_output_there(
    shape, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """The tokens after the one that completes a stop string are not appended, though the
    step emitted them: token ids and finish reasons are plain decoding's."""
    path = str(tiny_model_dir("qwen2"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    plain_llm = LLM(path, **ENGINE)
    free_run = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    texts = plain_llm.generate([{"prompt_token_ids": p} for p in prompts], free_run,
                               use_tqdm=False)  # fmt: skip
    future = {tuple(p): list(o.outputs[0].token_ids) + [0] * 8
              for p, o in zip(prompts, texts, strict=True)}  # fmt: skip
    if shape == "chain":
        _right_chains(monkeypatch, future)
    else:
        oracle_trees(monkeypatch, future)
    llm = LLM(path, speculative_config=SPEC, **ENGINE)
    stopped = 0
    for prompt, text in zip(prompts, texts, strict=True):
        for cut in (slice(5, 8), slice(9, 11), slice(14, 15)):
            stop = text.outputs[0].text[cut]
            if not stop.strip():
                continue
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
            want = plain_llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            got = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            (w,), (g,) = want[0].outputs, got[0].outputs
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
            stopped += w.finish_reason == "stop"
    assert stopped >= 5


def test_preemption_with_trees_is_lossless(tiny_model_dir, ordinary_token_ids, monkeypatch):
    """A cache with room for about one long sequence: sequences are preempted and recomputed
    between tree steps; the output is plain decoding's and every block comes back."""
    from parallm.engine.runner import kv_bytes_per_block

    path = str(tiny_model_dir("qwen3"))
    prompts = _repetitive_prompts(ordinary_token_ids) * 2
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain_llm = LLM(path, **ENGINE)
    plain = _tokens(plain_llm, prompts, params)
    per_block = kv_bytes_per_block(plain_llm.engine.model_config, 16, plain_llm.engine.dtype)
    tight = dict(ENGINE, max_model_len=256, kv_cache_memory=per_block * 18)
    tree_drafts(monkeypatch, _future(prompts, plain), seed=3)
    llm = LLM(path, speculative_config=SPEC, **tight)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    assert llm.engine.stats["num_preemptions"] > 0
    assert llm.engine.spec_stats.accepted_tokens > 0
    assert llm.engine.kv.num_free_blocks == free
