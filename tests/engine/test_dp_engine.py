"""Offline data parallelism: ``LLM(data_parallel_size=N)`` runs N engine-core processes behind
the prefix-aware router. Outputs equal one engine's, in order; a replica's death fails the next
generate with an error naming it, and no process is left behind."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from process_checks import assert_children_exit_when_killed

from parallm import LLM, SamplingParams
from parallm.cli import build_parser
from parallm.commands.engine_args import engine_kwargs
from parallm.engine import replica_devices
from parallm.engine.core.messages import CoreOutputs, RequestFailure
from parallm.engine.dp_router import PrefixRouter

ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "block_size": 16,
          "kv_cache_memory": 8 << 20}  # fmt: skip
PARAMS = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
ONE_SAMPLE = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompts(vocab: int) -> list[list[int]]:
    """Three prompts sharing a 32-token prefix and three that share nothing."""
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, vocab, 32).tolist()
    shared = [prefix + rng.integers(0, vocab, n).tolist() for n in (5, 17, 9)]
    return shared + [rng.integers(0, vocab, n).tolist() for n in (40, 3, 21)]


def _samples(outs) -> list:
    return [
        [(c.token_ids, c.text, c.finish_reason, [list(d) for d in c.logprobs]) for c in o.outputs]
        for o in outs
    ]


def test_data_parallel_outputs_equal_one_engine_in_order(tiny_model_dir, monkeypatch):
    path = str(tiny_model_dir("llama3"))
    one = LLM(path, **ENGINE)
    prompts = _prompts(one.engine.model_config.vocab_size)
    want = _samples(one.generate(prompts, PARAMS, use_tqdm=False))
    picks = []
    route = PrefixRouter.route

    def spy(self, request_id, prompt_token_ids):
        picks.append(route(self, request_id, prompt_token_ids))
        return picks[-1]

    monkeypatch.setattr(PrefixRouter, "route", spy)
    llm = LLM(path, data_parallel_size=2, **ENGINE)
    try:
        assert len(multiprocessing.active_children()) == 2
        got = _samples(llm.generate(prompts, PARAMS, use_tqdm=False))
        first_round = list(picks)
        again = _samples(llm.generate(prompts[:3], PARAMS, use_tqdm=False))
        streamed = [o.outputs[0].token_ids for o in llm.stream(prompts[3], ONE_SAMPLE)]
    finally:
        llm.close()
    assert got == want
    assert again == want[:3]
    assert sum(streamed, []) == want[3][0][0]
    assert sorted(set(first_round)) == [0, 1]  # both replicas served
    # The shared-prefix prompts follow the first one's replica, in both rounds.
    assert len(set(picks[:3] + picks[6:9])) == 1
    assert multiprocessing.active_children() == []


def test_replicas_may_each_be_tensor_parallel(tiny_model_dir):
    """data_parallel_size=2 x tensor_parallel_size=2: each replica process starts its own
    worker (replicas are not daemons, so that they may have children)."""
    path = str(tiny_model_dir("qwen3"))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 17, 42, 99, 7] * 4, [3, 11, 29] * 5, [8, 4, 2]]
    want = [o.outputs[0].token_ids for o in LLM(path, **ENGINE).generate(prompts, params)]
    llm = LLM(path, data_parallel_size=2, tensor_parallel_size=2, **ENGINE)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.close()
    assert got == want
    assert multiprocessing.active_children() == []


def test_a_killed_replica_fails_the_next_generate_and_nothing_is_left(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        replica = next(p for p in multiprocessing.active_children() if p.name.endswith("1"))
        assert len(llm.generate([[5, 17, 42, 99]], params, use_tqdm=False)) == 1
        with pytest.raises(ValueError, match=r"prompt_token_ids must be integers in \[0, "):
            llm.generate([[5, 10**9]], params, use_tqdm=False)  # checked here, before routing
        with pytest.raises(ValueError, match=r"prompt_token_ids must be integers in \[0, "):
            llm.engine.add_request("direct", [5, 10**9], params)  # the engine checks too
        assert llm.engine.router.load == [0, 0]
        assert not llm.engine.has_unfinished_requests()
        os.kill(replica.pid, signal.SIGKILL)
        replica.join(30)
        message = r"data-parallel replica 1 \(pid \d+\) exited with code -9"
        with pytest.raises(RuntimeError, match=message):
            llm.generate([[5, 17, 42], [7, 8, 9]], params, use_tqdm=False)
        assert multiprocessing.active_children() == []
        assert not llm.engine.has_unfinished_requests()
        with pytest.raises(RuntimeError, match=message):  # and stays failed
            llm.generate([[5, 17, 42]], params, use_tqdm=False)
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def test_replicas_exit_when_their_parent_is_killed(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("llama3"))
    engine = {**ENGINE, "data_parallel_size": 2}
    assert_children_exit_when_killed(tmp_path, path, "parallm-engine-core-dp", 2, **engine)


def test_a_replicas_bad_argument_is_a_value_error_and_nothing_is_left(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, \d+\], got 1000000"):
        LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, **{**ENGINE,
            "max_model_len": 1_000_000})  # fmt: skip
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("size", [0, -1, 1.5, "2", True])
def test_data_parallel_size_must_be_a_positive_integer(tiny_model_dir, size):
    with pytest.raises(ValueError, match=r"data_parallel_size must be an integer >= 1"):
        LLM(str(tiny_model_dir("llama3")), data_parallel_size=size, **ENGINE)
    assert multiprocessing.active_children() == []


def test_cli_flag_reaches_the_engine_and_bench_latency_refuses_it():
    args = build_parser().parse_args(["generate", "--data-parallel-size", "2", "x"])
    assert engine_kwargs(args)["data_parallel_size"] == 2
    assert engine_kwargs(build_parser().parse_args(["generate", "x"]))["data_parallel_size"] == 1
    assert (
        engine_kwargs(build_parser().parse_args(["serve", "-dp", "2"]))["data_parallel_size"] == 2
    )
    args = build_parser().parse_args(["bench", "throughput", "-dp", "2"])
    assert engine_kwargs(args)["data_parallel_size"] == 2
    args = build_parser().parse_args(["bench", "latency", "-dp", "2"])
    allowed = r"`parallm generate`, `parallm serve`, `parallm bench throughput`"
    with pytest.raises(ValueError, match=rf"--data-parallel-size above 1 works with {allowed} "
                                         r".* got 2 for `parallm bench latency`: .*no latency "
                                         r"of N replicas"):  # fmt: skip
        engine_kwargs(args)
    args = build_parser().parse_args(["bench", "throughput", "-dp", "2", "--compare-hf"])
    with pytest.raises(ValueError, match=r"--compare-hf runs transformers on one device"):
        engine_kwargs(args)


def test_every_replica_resets_its_prefix_cache_and_the_router_forgets(tiny_model_dir):
    """The reset is not acknowledged; each replica applies it before the requests sent after
    it, which then compute their prompts afresh (without it, they hit the cache)."""
    llm = LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, **ENGINE)
    try:
        prompts = _prompts(llm.engine.model_config.vocab_size)
        llm.generate(prompts, ONE_SAMPLE, use_tqdm=False)
        cached = [s.num_cached_blocks for s in llm.engine.replica_stats()]
        assert all(n > 0 for n in cached), cached  # both replicas served and cached
        assert all(llm.engine.router.cached)
        long_ones = [prompts[3], prompts[5]]  # 40 and 21 tokens: at least one full block each
        hits = [o.num_cached_tokens for o in llm.generate(long_ones, ONE_SAMPLE, use_tqdm=False)]
        assert all(n >= 16 for n in hits), hits  # routed back to the replica that caches it
        llm.reset_prefix_cache()
        assert not any(llm.engine.router.cached)
        assert sum(llm.engine.num_requests_routed) == len(prompts) + 2
        # Still serving, the same outputs, every prompt computed afresh.
        again = llm.generate(long_ones, ONE_SAMPLE, use_tqdm=False)
        assert [o.num_cached_tokens for o in again] == [0, 0]
        assert all(len(o.outputs[0].token_ids) == 10 for o in again)
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def test_reading_the_stats_between_steps_loses_no_output(tiny_model_dir):
    """Stats read mid-run (the latest each replica sent) leave every output to step()."""
    llm = LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, **ENGINE)
    engine = llm.engine
    try:
        prompts = _prompts(engine.model_config.vocab_size)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, ONE_SAMPLE)
        finished = {}
        while engine.has_unfinished_requests():
            engine.replica_stats()  # between steps: the outputs stay queued for step()
            finished |= {o.request_id: o for o in engine.step() if o.finished}
        assert sorted(finished, key=int) == [str(i) for i in range(len(prompts))]
        assert all(len(o.outputs[0].token_ids) == 10 for o in finished.values())
    finally:
        llm.close()


def test_replica_spec_stats_are_summed(tiny_model_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, speculative_config=spec,
              **ENGINE)  # fmt: skip
    try:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        llm.generate([[5, 17, 42, 99] * 6, [7, 3, 8, 1, 2] * 5], params, use_tqdm=False)
        total = llm.engine.spec_stats
        parts = llm.engine.replica_stats()
    finally:
        llm.close()
    assert all(p.spec_num_drafts > 0 for p in parts)  # both replicas drafted
    assert total.num_proposals == sum(p.spec_num_drafts for p in parts)
    assert total.draft_tokens == sum(p.spec_num_draft_tokens for p in parts)
    assert total.accepted_tokens == sum(p.spec_num_accepted_tokens for p in parts) > 0
    per_position = [p.spec_accepted_per_position for p in parts]
    width = max(len(p) for p in per_position)
    assert total.accepted_per_position == [
        sum(p[i] for p in per_position if i < len(p)) for i in range(width)
    ]


def test_more_replicas_than_gpus_fails_before_any_replica_starts(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(replica_devices, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = {**ENGINE, "device": "auto"}
    with pytest.raises(ValueError, match=r"data_parallel_size=3 x tensor_parallel_size=1 needs 3 "
                                         r"GPUs; this process sees 2 .*must be at most 2 here"):  # fmt: skip
        LLM(str(tiny_model_dir("llama3")), data_parallel_size=3, **engine)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match=r"needs 2 GPUs; this process sees 1"):
        LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, **engine)
    assert multiprocessing.active_children() == []


def test_requests_the_core_refuses_or_fails_end_with_their_error(tiny_model_dir):
    """A core's rejected and failed requests come back as one engine reports a failed
    request (finished, ``error`` set, the prompt kept), which LLM raises; the router lets go
    of them, a late output of theirs is dropped, and the engine goes on serving. (Real
    engines refuse nothing this process's checks pass, so the core's report is put on the
    engine's queue as its receiver thread would.)"""
    llm = LLM(str(tiny_model_dir("llama3")), data_parallel_size=2, **ENGINE)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    try:
        engine.add_request("refused", [5, 17, 42], params, prompt="refused prompt")
        engine.add_request("failed", [7, 8, 9, 10], params)
        assert engine.router.load == [1, 1]
        report = CoreOutputs(rejected=[RequestFailure("refused", "ValueError: no", 400)],
                             failures=[RequestFailure("failed", "RuntimeError: boom", 500)])  # fmt: skip
        for request_id in ("refused", "failed"):
            engine._inbox.put((engine.requests[request_id].replica, report))
        outs = {}
        while engine.has_unfinished_requests():
            outs |= {o.request_id: o for o in engine.step()}
        assert sorted(outs) == ["failed", "refused"]  # the cores' own outputs of them dropped
        assert (outs["refused"].finished, outs["refused"].error) == (True, "ValueError: no")
        assert outs["refused"].prompt == "refused prompt"
        assert outs["refused"].prompt_token_ids == [5, 17, 42]
        assert (outs["failed"].finished, outs["failed"].error) == (True, "RuntimeError: boom")
        assert engine.router.load == [0, 0]
        # LLM's first request is "0": its failure, queued first, reaches generate's first step.
        engine._inbox.put((0, CoreOutputs(failures=[RequestFailure("0", "RuntimeError: x")])))
        with pytest.raises(RuntimeError, match=r"request 0 failed: RuntimeError: x"):
            llm.generate([[1, 2, 3]], ONE_SAMPLE, use_tqdm=False)
        assert len(llm.generate([[1, 2, 3]], ONE_SAMPLE, use_tqdm=False)[0].outputs) == 1
    finally:
        llm.close()


def test_on_the_cpu_any_number_of_replicas_works(tiny_model_dir, caplog):
    llm = LLM(str(tiny_model_dir("llama3")), data_parallel_size=3, **ENGINE)
    try:
        assert "data_parallel_size=3 (replica 0: pid" in llm.engine.summary()
        assert "replica 2: pid" in llm.engine.summary()
        outs = llm.generate(_prompts(llm.engine.model_config.vocab_size), ONE_SAMPLE,
                            use_tqdm=False)  # fmt: skip
    finally:
        llm.close()
    assert len(outs) == 6 and all(len(o.outputs[0].token_ids) == 10 for o in outs)
    # A clean close: no replica is reported as died.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_the_summary_names_each_replicas_gpus():
    """(Which GPUs replica i sees: tests/server/test_data_parallel_serve_routing.py.)"""
    from parallm.engine.data_parallel import _placement

    assert _placement({"CUDA_VISIBLE_DEVICES": "2"}) == "GPU 2"
    assert _placement({"CUDA_VISIBLE_DEVICES": "2,3"}) == "GPUs 2,3"
    assert _placement({}) == "this process's devices"


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_replicas_use_one_gpu_each(tiny_model_dir):
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("needs 2 or more GPUs")
    path = str(tiny_model_dir("llama3"))
    engine = {"device": "cuda", "dtype": "float32", "max_model_len": 128,
              "gpu_memory_utilization": 0.5}  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 17, 42, 99, 7] * 4, [3, 11, 29] * 5, [8, 4, 2]] * n
    # Read after this process's own context exists on every GPU (the first query makes it).
    free_before = [torch.cuda.mem_get_info(gpu)[0] for gpu in range(n)]
    llm = LLM(path, data_parallel_size=n, **engine)
    try:
        assert all(f"replica {i}: pid" in llm.engine.summary() for i in range(n))
        assert f"replica {n - 1}: pid {llm.engine.replicas[-1].pid} on GPU {n - 1}" in (
            llm.engine.summary()
        )
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        # Each replica's engine (its CUDA context, weights and KV cache) took memory on its own
        # GPU. Not half the card: the engine caps the tiny model's KV cache far below that.
        used = [before - torch.cuda.mem_get_info(gpu)[0] for gpu, before in enumerate(free_before)]
        assert all(u > 64 << 20 for u in used), used
    finally:
        llm.close()
    assert multiprocessing.active_children() == []
    one = LLM(path, **engine)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    assert got == want
