"""The device drafter on CUDA (async scheduling and captured verify graphs, the defaults there):
the tokens of synchronous steps over the same full chains (the same graphs, so the same rows),
plain decoding's in float32, and a launch of a device-staged step that never waits for the
GPU."""

from __future__ import annotations

import random

import pytest
import torch

from parallm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _llm(path: str, dtype: str, async_scheduling: bool) -> LLM:
    llm = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20,
              cuda_graph_sizes=(1, 2, 4), speculative_config=SPEC,
              enable_prefix_caching=False, async_scheduling=async_scheduling)  # fmt: skip
    if not async_scheduling:  # the same full chains, staged from the host
        llm.engine.drafter.full_chains = True
    return llm


def _prompts(ordinary_token_ids: list[int]) -> list[list[int]]:
    rng = random.Random(3)
    return [rng.choices(ordinary_token_ids[:40], k=6) * 6 for _ in range(4)]


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_device_staged_steps_give_the_synchronous_steps_tokens_without_a_sync(
    dtype, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    prompts = _prompts(ordinary_token_ids)
    want = [_tokens(_llm(path, dtype, False), [p])[0] for p in prompts]
    llm = _llm(path, dtype, True)
    assert llm.engine.runner.device_drafts is not None
    runner, staged = llm.engine.runner, []
    launch = runner.launch

    def checked(batch, device_ids=None):
        if not batch.staged_on_device:
            return launch(batch, device_ids)
        staged.append(batch)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(batch, device_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(runner, "launch", checked)
    free = llm.engine.kv.num_free_blocks
    assert [_tokens(llm, [p])[0] for p in prompts] == want
    assert len(staged) > 10 and llm.engine.num_discarded_steps == 0
    assert llm.engine._inflight is None and llm.engine.kv.num_free_blocks == free
    if dtype == "float32":
        plain = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20)
        assert want == [_tokens(plain, [p])[0] for p in prompts]
