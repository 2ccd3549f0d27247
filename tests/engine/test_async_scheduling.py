"""Async scheduling (the next decode step launched before the current one is post-processed)
gives exactly the synchronous engine's outputs, and leaves no blocks or steps behind."""

from __future__ import annotations

import pytest
import torch
from arrivals import run_arrivals

from parallm import LLM, SamplingParams
from parallm.config import ModelConfig
from parallm.engine.runner import kv_bytes_per_block


def _llm(tiny_model_dir, async_scheduling: bool, **kwargs) -> LLM:
    kwargs = {"max_model_len": 256, **kwargs}
    return LLM(
        str(tiny_model_dir("llama3")), dtype="float32", device="cpu", block_size=8,
        async_scheduling=async_scheduling, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pair(tiny_model_dir) -> tuple[LLM, LLM]:
    return _llm(tiny_model_dir, False), _llm(tiny_model_dir, True)


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def _frequent_token(llm: LLM, prompts: list[list[int]]) -> int:
    """A token greedy decoding emits mid-sequence, to stop some requests at unforeseen steps."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)  # fmt: skip
    counts: dict[int, int] = {}
    for out in outs:
        for t in out.outputs[0].token_ids[3:]:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


def _assert_clean(llm: LLM) -> None:
    engine = llm.engine
    assert engine._inflight is None
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def _mixed_params(stop_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0.9, seed=3, max_tokens=17, n=3),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(
            temperature=0.7,
            top_p=0.9,
            seed=5,
            max_tokens=40,
            min_tokens=6,
            stop_token_ids=[stop_id],
        ),  # fmt: skip
        SamplingParams(temperature=0, max_tokens=25, stop=["a"]),
        SamplingParams(temperature=1.0, top_k=5, seed=11, max_tokens=9),
    ]


def _assert_same_outputs(sync: LLM, fast: LLM, prompts: list[list[int]]) -> None:
    batch = [{"prompt_token_ids": p} for p in prompts]
    params = _mixed_params(_frequent_token(sync, prompts))
    before = fast.engine.num_overlapped_steps
    expected = sync.generate(batch, params, use_tqdm=False)
    got = fast.generate(batch, params, use_tqdm=False)
    assert _tokens(got) == _tokens(expected)
    for field in ("text", "finish_reason"):
        assert [[getattr(c, field) for c in o.outputs] for o in got] == [
            [getattr(c, field) for c in o.outputs] for o in expected
        ]
    assert any(c.finish_reason == "stop" for o in got for c in o.outputs)
    assert fast.engine.num_overlapped_steps - before > 10
    _assert_clean(fast)


def test_greedy_and_seeded_sampling_match_the_synchronous_engine(pair, prompts):
    _assert_same_outputs(*pair, prompts)


@pytest.mark.gpu
def test_cuda_graph_steps_overlap_and_match(tiny_model_dir, prompts):
    """On CUDA (graphs, Triton kernels, async on by default) in float32: the same outputs."""
    path = str(tiny_model_dir("llama3"))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20)
    sync = LLM(path, async_scheduling=False, **common)
    fast = LLM(path, **common)
    assert fast.engine.async_scheduling and fast.engine.runner.graphs is not None
    _assert_same_outputs(sync, fast, prompts)


def test_fixed_length_requests_overlap(pair, prompts):
    # What `parallm bench serve` sends: min_tokens = max_tokens with ignore_eos bans nothing,
    # so these run ahead like any other request.
    sync, fast = pair
    batch = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=24, min_tokens=24, ignore_eos=True)
    before = fast.engine.num_overlapped_steps
    expected = sync.generate(batch, params, use_tqdm=False)
    got = fast.generate(batch, params, use_tqdm=False)
    assert _tokens(got) == _tokens(expected)
    assert fast.engine.num_overlapped_steps - before > 10
    _assert_clean(fast)


def test_penalties_and_logprobs_run_synchronously_and_still_match(pair, prompts):
    sync, fast = pair
    batch = [{"prompt_token_ids": p} for p in prompts[:3]]
    params = [
        SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=12, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20),
    ]
    expected = sync.generate(batch, params, use_tqdm=False)
    got = fast.generate(batch, params, use_tqdm=False)
    assert _tokens(got) == _tokens(expected)
    lp = got[1].outputs[0].logprobs
    assert lp == expected[1].outputs[0].logprobs and len(lp) == 12
    _assert_clean(fast)


def test_requests_arriving_and_aborted_mid_decode(pair, prompts):
    sync, fast = pair
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = {}
    for llm in (sync, fast):
        engine = llm.engine
        engine.add_request("a", prompts[0], params)
        engine.add_request("b", prompts[1], params)
        done: dict[str, list[int]] = {}
        for step in range(60):
            if step == 4:
                engine.add_request("c", prompts[2], params)
            if step == 7:
                engine.abort_request("b")
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        results[llm is fast] = done
        assert set(done) == {"a", "c"}
        _assert_clean(llm)
    assert results[True] == results[False]


def test_block_shortage_falls_back_to_preemption(tiny_model_dir, prompts):
    # 48 blocks of 8 tokens cannot hold the batch's 60 new tokens each: the step ahead must
    # give way to the synchronous scheduler, which preempts.
    path = tiny_model_dir("llama3")
    per_block = kv_bytes_per_block(ModelConfig.from_path(str(path)), 8, torch.float32)
    kwargs = dict(kv_cache_memory=49 * per_block, enable_prefix_caching=False, max_model_len=192)
    sync, fast = (_llm(tiny_model_dir, mode, **kwargs) for mode in (False, True))
    assert fast.engine.kv.num_blocks == 48
    batch = [{"prompt_token_ids": p[:40]} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    expected = sync.generate(batch, params, use_tqdm=False)
    got = fast.generate(batch, params, use_tqdm=False)
    assert _tokens(got) == _tokens(expected)
    assert fast.engine.scheduler.stats.num_preemptions > 0
    assert fast.engine.num_overlapped_steps > 0
    _assert_clean(fast)


def test_carried_ids_only_for_the_graphs_own_rows():
    """A continuation skips the id copy only when its ids are exactly the graph's greedy output
    rows 0..batch-1 (same storage, contiguous), never a gathered or sliced copy."""
    from parallm.engine.decode_graph import _same_view

    greedy = torch.arange(8)
    assert _same_view(greedy[:5], greedy, 5)
    assert not _same_view(greedy[:5].clone(), greedy, 5)  # gathered after a drop
    assert not _same_view(greedy[1:6], greedy, 5)  # shifted rows
    assert not _same_view(greedy[:6], greedy, 5)  # another batch size
    assert not _same_view(greedy[::2][:4], greedy, 4)  # strided


def test_first_decode_step_overlaps_the_prefill(pair, prompts):
    """The decode step after a prompt's last chunk launches while that chunk still runs: a
    request of n tokens then takes one prefill and n - 1 overlapped decode steps."""
    sync, fast = pair
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batch = [{"prompt_token_ids": prompts[2]}]
    before, steps = fast.engine.num_overlapped_steps, fast.engine.num_steps
    got = fast.generate(batch, params, use_tqdm=False)
    assert _tokens(got) == _tokens(sync.generate(batch, params, use_tqdm=False))
    assert fast.engine.num_steps - steps == 8
    assert fast.engine.num_overlapped_steps - before == 7
    _assert_clean(fast)


def test_prompts_arriving_mid_decode_join_a_step_launched_ahead(pair, prompts):
    """A prompt that arrives while others decode (a free slot, budget and blocks) joins the
    step launched ahead, beside the decode rows whose tokens are still on the device: every
    step but the first runs ahead, where each arrival used to wait for the step in flight.
    The outputs are the synchronous engine's, for greedy, seeded sampling, n > 1 and a
    one-token prompt (a step of one token a sequence that is not a pure decode step)."""
    sync, fast = pair
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=4, max_tokens=9, ignore_eos=True)
    queue = [prompts[3], prompts[0], prompts[1], prompts[2], prompts[4][:40]]  # prompts[0]: 1
    params = [greedy, greedy, seeded, greedy, seeded]
    at = [0, 3, 4, 6, 9]
    want, _, _ = run_arrivals(sync, queue, params, at)
    got, steps, ahead = run_arrivals(fast, queue, params, at)
    assert got == want and len(got) == len(queue)
    assert ahead == steps - 1, (ahead, steps)
    _assert_clean(fast)
    # n > 1: the siblings after the first wait for its prompt blocks, then run ahead too.
    fanned = [SamplingParams(temperature=0.9, seed=2, max_tokens=6, n=3, ignore_eos=True), greedy]
    want, _, _ = run_arrivals(sync, [prompts[1], prompts[2]], fanned, [0, 2])
    got, _, _ = run_arrivals(fast, [prompts[1], prompts[2]], fanned, [0, 2])
    assert got == want
    _assert_clean(fast)


def test_a_full_prefix_hit_joins_a_step_launched_ahead_as_one_token_row(pair, prompts):
    """A prompt whose full blocks are all cached arrives mid-decode: the step launched ahead
    admits it as one more row of one token (its last), so the step stays a pure decode step
    (the decode graph's shape on CUDA) with the decode rows' ids on the device and the
    prompt's on the host. The outputs are the synchronous engine's."""
    sync, fast = pair
    block = fast.engine.kv.block_size
    hit = [t for p in prompts for t in p][: 2 * block + 1]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for llm in pair:  # the hit's two full blocks cached, as a served conversation leaves them
        llm.generate([{"prompt_token_ids": hit}], greedy, use_tqdm=False)
    batches = []
    real_launch = fast.engine.runner.launch

    def recording(batch, device_ids=None):
        batches.append((batch.is_pure_decode, batch.num_admitted, batch.known_on_device))
        return real_launch(batch, device_ids=device_ids)

    fast.engine.runner.launch = recording
    try:
        queue, at = [prompts[2], prompts[3], hit], [0, 0, 4]
        want, _, _ = run_arrivals(sync, queue, [greedy] * 3, at)
        got, _, _ = run_arrivals(fast, queue, [greedy] * 3, at)
    finally:
        del fast.engine.runner.launch
    assert got == want
    assert (True, 1, True) in batches, batches
    _assert_clean(fast)


def test_a_prompt_over_the_budget_is_admitted_ahead_in_chunks(tiny_model_dir, prompts):
    """Under a 32-token budget a long prompt arriving mid-decode is admitted ahead with the
    budget the decode rows leave; its later chunks wait for the step before (a chunk that
    samples nothing has no token for a step launched ahead to follow)."""
    sync, fast = (_llm(tiny_model_dir, mode, max_num_batched_tokens=32) for mode in (False, True))
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * 3
    queue, at = [prompts[2], prompts[1], prompts[5][:100]], [0, 0, 3]
    want, _, _ = run_arrivals(sync, queue, params, at)
    got, steps, ahead = run_arrivals(fast, queue, params, at)
    assert got == want
    assert 0 < ahead < steps - 1
    _assert_clean(fast)
