"""Verify steps launched ahead on CUDA (async scheduling, the default there): the tokens of
the same engine with synchronous steps (the same verify graphs and kernels, so the same
rows), and a launch ahead that never waits for the GPU. Drafts come from an oracle (plain
decoding's tokens, some wrong), so that steps launch ahead behind fully accepted ones."""

from __future__ import annotations

import random

import pytest
import torch
from test_verify_ahead import _oracle_lookup

from parallm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _llm(path: str, dtype: str, async_scheduling: bool) -> LLM:
    llm = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20,
              cuda_graph_sizes=(1, 2, 4), speculative_config=SPEC,
              enable_prefix_caching=False, async_scheduling=async_scheduling)  # fmt: skip
    # The host path's steps launched ahead: without the device drafter, which takes over
    # prompt lookup's full chains under async scheduling.
    llm.engine.runner.device_drafts = None
    llm.engine.use_full_chains(False)
    return llm


def _prompts(ordinary_token_ids: list[int]) -> list[list[int]]:
    rng = random.Random(3)
    return [rng.choices(ordinary_token_ids[:40], k=6) * 6 for _ in range(4)]


def launches_without_sync(monkeypatch, runner, watched) -> list:
    """The batches ``runner`` launches for which ``watched(batch)`` holds, each launch made
    in CUDA's sync-debug "error" mode: a launch that waits for the GPU raises."""
    launched, launch = [], runner.launch

    def checked(batch, device_ids=None):
        if not watched(batch):
            return launch(batch, device_ids)
        launched.append(batch)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch, device_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(runner, "launch", checked)
    return launched


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_steps_launched_ahead_give_the_synchronous_steps_tokens_without_a_sync(
    dtype, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    prompts = _prompts(ordinary_token_ids)
    # Plain decoding's tokens as drafts, about one proposal in four with a wrong one (by
    # position, so both engines get the same drafts): the gate opens behind fully accepted
    # steps, and some steps launched ahead are discarded.
    plain = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20)
    future = {tuple(p): t for p, t in zip(prompts, _tokens(plain, prompts), strict=True)}
    _oracle_lookup(monkeypatch, future, 4)
    want = [_tokens(_llm(path, dtype, False), [p])[0] for p in prompts]
    llm = _llm(path, dtype, True)
    runner = llm.engine.runner
    ahead = launches_without_sync(monkeypatch, runner, lambda batch: batch.known_on_device)
    free = llm.engine.kv.num_free_blocks
    assert [_tokens(llm, [p])[0] for p in prompts] == want
    assert ahead and runner.verify_graphs.num_replays > 0
    assert 0 < llm.engine.num_discarded_steps < len(ahead)
    assert llm.engine._inflight is None and llm.engine.kv.num_free_blocks == free
