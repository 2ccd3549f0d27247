"""With async scheduling, a greedy verify step launches behind the previous one as if that one
accepts all its drafts (its known token comes from the device, its drafts from prompt lookup
over the drafts before), but only where every sequence's last verified step accepted all of its
own (the gate): when a sequence accepts fewer, the step is discarded and its KV slots go back.
Either way the output is plain decoding's, token for token, and nothing leaks."""

from __future__ import annotations

import pytest
from test_speculative import (
    ENGINE,
    MIXED_PARAMS,
    SPEC,
    _repetitive_prompts,
    _tokens,
    oracle_drafts,
)
from tiny_models import ARCHS

from parallm import LLM, SamplingParams


def _ahead_llm(path: str, **kwargs) -> LLM:
    return LLM(path, speculative_config=SPEC, async_scheduling=True, **{**ENGINE, **kwargs})


def _check_clean(llm: LLM, free: int) -> None:
    assert llm.engine._inflight is None
    assert llm.engine.kv.num_free_blocks == free  # rejected and discarded slots all came back


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_is_plain_decodings_with_steps_launched_ahead(
    arch, tiny_model_dir, ordinary_token_ids
):
    path = str(tiny_model_dir(arch))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    llm = _ahead_llm(path)
    free = llm.engine.kv.num_free_blocks
    for prompt, want in zip(prompts, plain, strict=True):  # batch 1
        assert _tokens(llm, [prompt], params) == [want]
    assert _tokens(llm, prompts, params) == plain  # and a batch, with chunked prefill
    assert llm.engine.stats["spec_draft_tokens"] > 0
    _check_clean(llm, free)


def test_no_step_launches_ahead_behind_one_that_rejected_a_draft(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Oracle drafts with every third one wrong: no step accepts all its drafts, so the gate
    launches none ahead."""
    path = str(tiny_model_dir("llama3"))
    prompt = _repetitive_prompts(ordinary_token_ids)[0]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), [prompt], params)
    future = {tuple(prompt): plain[0][0]}
    oracle_drafts(monkeypatch, future)  # the third draft of each proposal is wrong
    llm = _ahead_llm(path)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, [prompt], params) == plain
    stats = llm.engine.stats
    assert stats["spec_draft_tokens"] > 0 and stats["num_overlapped_steps"] == 0
    _check_clean(llm, free)


def _oracle_lookup(
    monkeypatch, future: dict[tuple[int, ...], list[int]], wrong_every: int | None = None
) -> None:
    """Prompt lookup replaced by plain decoding's next ``k`` tokens after ``token_ids``; with
    ``wrong_every``, about one proposal in that many has a wrong third draft, chosen by the
    position alone (so that engines that propose at the same positions get the same drafts;
    after a wrong draft taken as accepted, the lookup reads on at the same length)."""
    from parallm.engine.spec import drafting

    def propose(token_ids, k, lookup_min, lookup_max):
        for prompt, out in future.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                if wrong_every is None:
                    assert list(token_ids[len(prompt) :]) == out[:done]  # drafts taken as right
                drafts = list(out[done : done + k])
                if wrong_every and (done * 7919) % wrong_every == 0 and len(drafts) > 2:
                    drafts[2] = (drafts[2] + 1) % 50
                return drafts
        raise AssertionError("unknown prompt")

    monkeypatch.setattr(drafting, "propose_ngram", propose)


def test_steps_behind_fully_accepted_ones_are_all_kept(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Drafts that are always right: every step launched ahead is kept (its drafts continue
    the drafts before it, behind the token guessed after them), and each step emits five."""
    path = str(tiny_model_dir("qwen3"))
    prompts = _repetitive_prompts(ordinary_token_ids)[:2]
    params = SamplingParams(temperature=0, max_tokens=31, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    _oracle_lookup(monkeypatch, {tuple(p): o[0] for p, o in zip(prompts, plain, strict=True)})
    llm = _ahead_llm(path)
    free = llm.engine.kv.num_free_blocks
    for prompt, want in zip(prompts, plain, strict=True):
        steps = llm.engine.num_steps
        assert _tokens(llm, [prompt], params) == [want]
        # The prompt, the first token's step, then 30 tokens five a step.
        assert llm.engine.num_steps - steps <= 1 + 1 + 6 + 1
    stats = llm.engine.stats
    assert stats["num_overlapped_steps"] >= 8 and stats["num_discarded_steps"] == 0
    _check_clean(llm, free)


def test_steps_behind_fully_accepted_ones_launch_and_are_discarded_when_a_draft_fails(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Every third proposal has a wrong draft: a step behind a fully accepted one launches
    ahead, and is discarded when the step before it rejects a draft; the tokens stay plain
    decoding's."""
    path = str(tiny_model_dir("llama3"))
    prompt = _repetitive_prompts(ordinary_token_ids)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), [prompt], params)
    _oracle_lookup(monkeypatch, {tuple(prompt): plain[0][0]}, wrong_every=4)
    llm = _ahead_llm(path)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, [prompt], params) == plain
    stats = llm.engine.stats
    assert 0 < stats["num_discarded_steps"] < stats["num_overlapped_steps"]
    _check_clean(llm, free)


def test_limits_stops_and_mixed_requests_with_steps_launched_ahead(
    tiny_model_dir, ordinary_token_ids
):
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    plain_llm, llm = LLM(path, **ENGINE), _ahead_llm(path)
    free = llm.engine.kv.num_free_blocks
    for params in MIXED_PARAMS:
        want = _tokens(plain_llm, prompts, params)
        assert _tokens(llm, prompts, params) == want, params
        assert [_tokens(llm, [p], params)[0] for p in prompts] == want, params
    _check_clean(llm, free)
    # The context's end: the last steps may carry fewer drafts, or none.
    short = dict(max_model_len=96)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompt = prompts[0][:30]
    assert _tokens(_ahead_llm(path, **short), [prompt], params) == _tokens(
        LLM(path, **ENGINE, **short), [prompt], params
    )


def test_preemption_and_aborts_with_steps_launched_ahead(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Drafts always right, so the gate keeps launching steps ahead."""
    path = str(tiny_model_dir("qwen3"))
    prompts = _repetitive_prompts(ordinary_token_ids) * 2
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    aborted = [*ordinary_token_ids[:5]] * 8
    plain = _tokens(LLM(path, **ENGINE), [*prompts, aborted], params)
    future = {tuple(p): o[0] for p, o in zip([*prompts, aborted], plain, strict=True)}
    plain = plain[:-1]
    _oracle_lookup(monkeypatch, future)
    from parallm.engine.runner import kv_bytes_per_block

    engine = LLM(path, **ENGINE).engine
    per_block = kv_bytes_per_block(engine.model_config, 16, engine.dtype)
    llm = _ahead_llm(path, kv_cache_memory=per_block * 18, max_model_len=256)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    assert llm.engine.stats["num_preemptions"] > 0
    _check_clean(llm, free)
    # Aborted while a step runs ahead of it: its blocks come back all the same.
    engine = _ahead_llm(path).engine
    free = engine.kv.num_free_blocks
    engine.add_request("r0", aborted, params)
    for _ in range(200):
        engine.step()
        if engine._inflight is not None:
            break
    assert engine._inflight is not None and engine._inflight.batch.known_on_device
    engine.abort_request("r0")
    while engine.has_unfinished_requests() or engine._inflight is not None:
        engine.step()
    assert engine.kv.num_free_blocks == free


@pytest.mark.parametrize("right", [True, False])
def test_verify_graph_buffers_take_the_known_tokens_from_the_device(
    right, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Steps launched ahead through the verify graphs' static buffers (run uncaptured on CPU):
    each sequence's known token is written into its first row on the device. Drafts right
    (steps kept) or every third proposal wrong (some discarded): plain decoding's tokens
    either way."""
    from parallm.engine.verify_graph import drafter_shapes

    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)[:3]
    params = SamplingParams(temperature=0, max_tokens=26, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    future = {tuple(p): o[0] for p, o in zip(prompts, plain, strict=True)}
    _oracle_lookup(monkeypatch, future, None if right else 3)
    llm = _ahead_llm(path)
    engine = llm.engine
    shapes = drafter_shapes(engine.drafter, [1, 2, 4], engine.config.max_num_batched_tokens)
    engine.runner.capture_verify_graphs(shapes, engine.max_model_len, capture=False)
    free = engine.kv.num_free_blocks
    assert [_tokens(llm, [p], params)[0] for p in prompts] == plain
    assert _tokens(llm, prompts, params) == plain
    assert engine.runner.verify_graphs.num_replays > 0
    kept = engine.num_overlapped_steps - engine.num_discarded_steps
    assert kept > 0 if right else engine.num_discarded_steps > 0
    _check_clean(llm, free)
