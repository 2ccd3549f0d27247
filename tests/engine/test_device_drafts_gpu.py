"""The device drafter on CUDA (async scheduling and captured verify graphs, the defaults there):
the tokens of synchronous steps over the same full chains (the same graphs, so the same rows),
plain decoding's in float32, and a launch of a device-staged step that never waits for the
GPU."""

from __future__ import annotations

import pytest
from test_verify_ahead_gpu import SPEC, _prompts, _tokens, launches_without_sync

from parallm import LLM

pytestmark = pytest.mark.gpu


def _llm(path: str, dtype: str, async_scheduling: bool) -> LLM:
    llm = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20,
              cuda_graph_sizes=(1, 2, 4),
              speculative_config={**SPEC, "prompt_lookup_history_tokens": 0},  # own lookups
              enable_prefix_caching=False, async_scheduling=async_scheduling)  # fmt: skip
    if not async_scheduling:  # the same full chains, staged from the host
        llm.engine.use_full_chains(True)
    return llm


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_device_staged_steps_give_the_synchronous_steps_tokens_without_a_sync(
    dtype, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    prompts = _prompts(ordinary_token_ids)
    want = [_tokens(_llm(path, dtype, False), [p])[0] for p in prompts]
    llm = _llm(path, dtype, True)
    assert llm.engine.runner.device_drafts is not None
    runner = llm.engine.runner
    staged = launches_without_sync(monkeypatch, runner, lambda batch: batch.staged_on_device)
    free = llm.engine.kv.num_free_blocks
    assert [_tokens(llm, [p])[0] for p in prompts] == want
    assert len(staged) > 10 and llm.engine.num_discarded_steps == 0
    assert llm.engine._inflight is None and llm.engine.kv.num_free_blocks == free
    if dtype == "float32":
        plain = LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20)
        assert want == [_tokens(plain, [p])[0] for p in prompts]
