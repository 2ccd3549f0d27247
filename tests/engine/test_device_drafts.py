"""The device drafter (docs/DEVICE_DRAFTER.md): with async scheduling, a greedy prompt-lookup
verify step stages its successor on the device (acceptance, the next drafts, the next inputs)
and the successor launches before the step's tokens reach the host, whatever it accepts. Run
on CPU through the verify graphs' buffers uncaptured, the kernels' PyTorch twins standing in.
Tokens are plain decoding's, every block comes back."""

from __future__ import annotations

import pytest
from test_speculative import ENGINE, SPEC, _repetitive_prompts, _tokens
from test_verify_ahead import _oracle_lookup

from parallm import LLM, SamplingParams
from parallm.engine.verify_graph import drafter_shapes


def _device_llm(path: str, spec: dict = SPEC, **kwargs) -> LLM:
    llm = LLM(path, speculative_config=spec, async_scheduling=True, **{**ENGINE, **kwargs})
    engine = llm.engine
    shapes = drafter_shapes(engine.drafter, [1, 2, 4], engine.config.max_num_batched_tokens)
    engine.runner.capture_verify_graphs(shapes, engine.max_model_len, capture=False)
    assert engine.enable_device_drafting()
    return llm


def _check_clean(llm: LLM, free: int) -> None:
    assert llm.engine._inflight is None
    assert llm.engine.kv.num_free_blocks == free


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_greedy_output_is_plain_decodings_with_device_drafts(
    arch, tiny_model_dir, ordinary_token_ids
):
    path = str(tiny_model_dir(arch))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    # The own lookup alone (these prompts' drafts are always right): a draft from the ring of
    # earlier requests may be wrong, and a step the host launched ahead on it is discarded.
    llm = _device_llm(path, {**SPEC, "prompt_lookup_history_tokens": 0})
    engine = llm.engine
    free = engine.kv.num_free_blocks
    for prompt, want in zip(prompts, plain, strict=True):  # batch 1
        assert _tokens(llm, [prompt], params) == [want]
    assert _tokens(llm, prompts, params) == plain  # and a batch, with chunked prefill
    stats = engine.stats
    assert stats["spec_draft_tokens"] > 0 and stats["num_discarded_steps"] == 0
    assert stats["num_overlapped_steps"] > 10  # device-staged steps
    _check_clean(llm, free)


def test_spec_stats_count_proposals_as_the_host_drafter_does(tiny_model_dir, ordinary_token_ids):
    """A full chain's fillers are no proposal: a step whose lookup found nothing (n-grams of 3
    and more rarely recur here) or found fewer than k drafts counts as the host drafter's
    step with the same context would, so tokens per drafted step are the host's."""
    path = str(tiny_model_dir("llama3"))
    spec = {**SPEC, "num_speculative_tokens": 8, "prompt_lookup_min": 3, "prompt_lookup_max": 4}
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    host = LLM(path, speculative_config=spec, async_scheduling=True, **ENGINE)
    want = _tokens(host, prompts[:2], params)
    llm = _device_llm(path, spec)
    assert _tokens(llm, prompts[:2], params) == want
    assert llm.engine.stats["num_overlapped_steps"] > 10  # device-staged steps
    got, expected = llm.engine.spec_stats, host.engine.spec_stats
    assert expected.num_proposals > 0
    assert got == expected


def test_device_steps_follow_steps_that_rejected_drafts(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """The host's first proposals from an oracle with every fourth one wrong; the device's own
    prompt lookup after that: steps launch behind partly accepted ones and stay correct."""
    path = str(tiny_model_dir("llama3"))
    prompt = _repetitive_prompts(ordinary_token_ids)[0]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), [prompt], params)
    _oracle_lookup(monkeypatch, {tuple(prompt): plain[0][0]}, wrong_every=4)
    llm = _device_llm(path)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, [prompt], params) == plain
    stats = llm.engine.stats
    assert stats["num_overlapped_steps"] > 0
    assert stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # some were rejected
    _check_clean(llm, free)


def test_limits_and_the_context_end_with_device_drafts(tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    plain_llm, llm = LLM(path, **ENGINE), _device_llm(path)
    free = llm.engine.kv.num_free_blocks
    for params in [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 7, 23)
    ]:
        want = _tokens(plain_llm, prompts, params)
        assert [_tokens(llm, [p], params)[0] for p in prompts] == want, params
    _check_clean(llm, free)
    short = dict(max_model_len=96)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompt = prompts[0][:30]
    assert _tokens(_device_llm(path, **short), [prompt], params) == _tokens(
        LLM(path, **ENGINE, **short), [prompt], params
    )


def test_device_staged_steps_run_to_max_tokens(tiny_model_dir, ordinary_token_ids):
    """Full chains are cut by the context alone: drafts past ``max_tokens`` are verified (a
    filler would take the row anyway), so once a request's steps are staged on the device
    they stay there to its last token. Its tokens are plain decoding's, cut at max_tokens, and
    the counters see only the drafts it could emit."""
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)[:3]
    llm = _device_llm(path, {**SPEC, "prompt_lookup_history_tokens": 0})
    engine = llm.engine
    staged, launch = [], engine.runner.launch

    def recorded(batch, *args, **kwargs):
        staged.append(batch.staged_on_device)
        return launch(batch, *args, **kwargs)

    engine.runner.launch = recorded
    free = engine.kv.num_free_blocks
    for n in (9, 26, 41):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        want = _tokens(LLM(path, **ENGINE), prompts, params)
        for prompt, tokens in zip(prompts, want, strict=True):
            staged.clear()
            accepted = engine.spec_stats.accepted_tokens
            assert _tokens(llm, [prompt], params) == [tokens]
            assert True in staged and all(staged[staged.index(True) :]), (n, staged)
            # Accepted drafts never outnumber the tokens after each step's first.
            assert engine.spec_stats.accepted_tokens - accepted <= n - 1
    _check_clean(llm, free)


def test_an_abort_with_a_device_step_in_flight(tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir("qwen3"))
    prompt = _repetitive_prompts(ordinary_token_ids)[0]
    engine = _device_llm(path).engine
    free = engine.kv.num_free_blocks
    engine.add_request("r0", prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    for _ in range(40):
        engine.step()
        if engine._inflight is not None and engine._inflight.batch.staged_on_device:
            break
    assert engine._inflight is not None and engine._inflight.batch.staged_on_device
    engine.abort_request("r0")
    while engine.has_unfinished_requests() or engine._inflight is not None:
        engine.step()
    assert engine.kv.num_free_blocks == free


def test_a_queue_behind_a_full_batch_keeps_steps_on_the_device(tiny_model_dir, ordinary_token_ids):
    """More requests than ``max_num_seqs``: the waiting ones cannot join until a running one
    finishes, so they must not hold the running ones' steps on the host (a server under load
    always has such a queue). The outputs stay plain decoding's and nothing leaks."""
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = _tokens(LLM(path, **ENGINE), prompts, params)
    llm = _device_llm(path, {**SPEC, "prompt_lookup_history_tokens": 0}, max_num_seqs=2)
    engine = llm.engine
    staged_while_queued, launch = [], engine.runner.launch

    def recorded(batch, *args, **kwargs):
        if engine.scheduler.waiting:
            staged_while_queued.append(batch.staged_on_device)
        return launch(batch, *args, **kwargs)

    engine.runner.launch = recorded
    free = engine.kv.num_free_blocks
    assert len(prompts) > 2
    assert _tokens(llm, prompts, params) == want
    assert sum(staged_while_queued) > len(staged_while_queued) / 2, staged_while_queued
    _check_clean(llm, free)
