"""Speculative decoding inside continuous batching is lossless: with n-gram drafts, greedy and
seeded sampled output is token-identical to plain decoding on every family (float32, CPU),
through chunked prefill, prefix caching, preemption, stop strings, max_tokens, min_tokens and
n > 1, next to requests that are not drafted (penalties); no KV block leaks."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
from tiny_models import ARCHS

from parallm import LLM, SamplingParams

SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=8 << 20, block_size=16,
              max_num_batched_tokens=64, enable_prefix_caching=True)  # fmt: skip


def _repetitive_prompts(ordinary_token_ids: list[int]) -> list[list[int]]:
    """Prompts that repeat short patterns, so prompt lookup finds matches, plus a shared
    prefix (prefix-cache hits) and one long prompt (chunked prefill)."""
    rng = random.Random(7)
    pattern = rng.choices(ordinary_token_ids, k=6)
    shared = rng.choices(ordinary_token_ids, k=40)
    return [
        pattern * 5,
        shared + pattern * 2,
        shared + rng.choices(ordinary_token_ids, k=9),
        rng.choices(ordinary_token_ids, k=150),
        rng.choices(ordinary_token_ids, k=3),
    ]


def oracle_drafts(monkeypatch, future: dict[tuple[int, ...], list[int]]) -> None:
    """Make every drafter propose plain decoding's next 4 tokens (``future``, by prompt), the
    third of each proposal wrong: only drafts 0 and 1 can be kept."""
    from parallm.engine.spec import drafting

    def oracle(self, running):
        for seq in running:
            if not drafting.draftable(seq):
                continue
            done = seq.num_output_tokens
            drafts = list(future[tuple(seq.prompt_token_ids)][done : done + 4])
            if len(drafts) >= 3:
                drafts[2] = (drafts[2] + 1) % 50
            seq.draft_token_ids = drafts

    monkeypatch.setattr(drafting.Drafter, "propose", oracle)


def _tokens(llm: LLM, prompts, params) -> list[list[list[int]]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_is_identical_with_ngram_drafts(arch, tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir(arch))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    llm = LLM(path, speculative_config=SPEC, **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    assert llm.engine.stats["spec_draft_tokens"] > 0
    assert llm.engine.kv.num_free_blocks == free  # rejected drafts' blocks all came back


@pytest.mark.parametrize(
    ("arch", "temperature"), [("llama3", 0.0), ("qwen2", 0.0), ("qwen3", 0.0), ("qwen3", 0.9)]
)
def test_oracle_drafts_are_accepted_until_the_first_wrong_one(
    arch, temperature, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Drafts that are plain decoding's next tokens, every third one replaced by a wrong
    token: each step keeps the drafts before the first wrong one, the output is unchanged,
    and the engine takes fewer steps."""
    path = str(tiny_model_dir(arch))
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=temperature, max_tokens=30, ignore_eos=True, seed=5)
    plain_llm = LLM(path, **ENGINE)
    plain = _tokens(plain_llm, prompts, params)
    plain_steps = plain_llm.engine.num_steps
    future = {tuple(p): out[0] for p, out in zip(prompts, plain, strict=True)}

    oracle_drafts(monkeypatch, future)
    llm = LLM(path, speculative_config=SPEC, **ENGINE)
    assert _tokens(llm, prompts, params) == plain
    spec = llm.engine.spec_stats
    by_position = spec.accepted_per_position
    # Every proposal's first draft is right, no third one ever is.
    assert spec.num_proposals > 0 and by_position[0] == spec.num_proposals
    assert len(by_position) < 3 or by_position[2] == 0
    assert llm.engine.stats["spec_accepted_tokens"] == sum(by_position)
    assert llm.engine.num_steps < plain_steps


# Limits, min_tokens, n > 1, sampled and penalised requests, logprobs.
MIXED_PARAMS = [
    SamplingParams(temperature=0, max_tokens=23, ignore_eos=True),  # ends inside a run
    SamplingParams(temperature=0, max_tokens=30, min_tokens=12),
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=3, ignore_eos=True),
    SamplingParams(temperature=0.8, max_tokens=20, seed=3, repetition_penalty=1.2),
    SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True),
]


def test_stops_limits_and_mixed_requests_are_unchanged(tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    cases = MIXED_PARAMS
    plain_llm, spec_llm = LLM(path, **ENGINE), LLM(path, speculative_config=SPEC, **ENGINE)
    for params in cases:
        assert _tokens(spec_llm, prompts, params) == _tokens(plain_llm, prompts, params), params
    # A stop string found in the middle of an accepted run cuts the output there too.
    text = plain_llm.generate([{"prompt_token_ids": prompts[0]}], cases[0], use_tqdm=False)
    stop = text[0].outputs[0].text[5:8]
    if stop.strip():
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
        want = plain_llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        got = spec_llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        assert got[0].outputs[0].text == want[0].outputs[0].text


def test_seeded_sampling_with_drafts_is_reproducible(tiny_model_dir, ordinary_token_ids):
    """A drafted sampled request draws one sample per emitted token, as plain decoding does:
    with a seed its tokens are plain decoding's, alone, in a batch, and again."""
    path = str(tiny_model_dir("qwen2"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    llm, plain_llm = LLM(path, speculative_config=SPEC, **ENGINE), LLM(path, **ENGINE)
    params = [
        SamplingParams(temperature=0.7, top_k=20, max_tokens=24, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    batch = [{"prompt_token_ids": p} for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    assert llm.engine.stats["spec_draft_tokens"] > 0
    alone = [
        llm.generate([b], p, use_tqdm=False)[0].outputs[0].token_ids
        for b, p in zip(batch, params, strict=True)
    ]
    again = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    plain = [o.outputs[0].token_ids for o in plain_llm.generate(batch, params, use_tqdm=False)]
    assert together == alone == again == plain
    assert len({tuple(t) for t in together}) > 1


def test_preemption_with_drafts_is_lossless(tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir("qwen3"))
    prompts = _repetitive_prompts(ordinary_token_ids) * 2
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    tight = dict(ENGINE, max_model_len=256)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    from parallm.engine.runner import kv_bytes_per_block

    llm = LLM(path, **ENGINE)
    per_block = kv_bytes_per_block(llm.engine.model_config, 16, llm.engine.dtype)
    tight["kv_cache_memory"] = per_block * 18  # room for about one long sequence at a time
    spec = LLM(path, speculative_config=SPEC, **tight)
    free = spec.engine.kv.num_free_blocks
    assert _tokens(spec, prompts, params) == plain
    assert spec.engine.stats["num_preemptions"] > 0
    assert spec.engine.kv.num_free_blocks == free


def test_bad_speculative_configs_are_refused_before_loading(tiny_model_dir):
    path = str(tiny_model_dir("llama3"))
    with pytest.raises(ValueError, match="speculative_config.method"):
        LLM(path, speculative_config={"method": "magic", "num_speculative_tokens": 2}, **ENGINE)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_async_scheduling_and_drafts_take_turns_by_batch_size(
    temperature, tiny_model_dir, ordinary_token_ids
):
    """With async scheduling, steps of more than ``disable_by_batch_size`` sequences run
    ahead and smaller ones speculate; the output is plain decoding's and nothing is left
    behind, whichever kind of step a sequence ends in."""
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids) * 2  # 10 sequences, then fewer
    params = [
        SamplingParams(temperature=temperature, seed=i, max_tokens=8 + 6 * i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    spec = {**SPEC, "disable_by_batch_size": 3}
    llm = LLM(path, speculative_config=spec, async_scheduling=True, **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    stats = llm.engine.stats
    assert stats["num_overlapped_steps"] > 0 and stats["spec_draft_tokens"] > 0
    assert llm.engine._inflight is None and llm.engine.kv.num_free_blocks == free
    assert llm.engine.summary().endswith(
        "async scheduling on; speculative decoding: ngram, 4 tokens, batches of up to 3"
    )


@pytest.mark.parametrize("method", ["none", "ngram"])
def test_a_dropped_llm_frees_its_runner_without_a_gc_pass(tiny_model_dir, method):
    """Dropping an LLM frees its runner by reference counting: a cycle through the runner
    would keep its weights, KV cache and CUDA graphs until a full GC pass, and the next engine
    of the process would plan its KV cache around them (the spec benchmarks drop the plain
    engine before building the speculative one)."""
    spec = None if method == "none" else {"method": method, "num_speculative_tokens": 2}
    llm = LLM(str(tiny_model_dir("llama3")), speculative_config=spec, **ENGINE)
    runner = weakref.ref(llm.engine.runner)
    gc.disable()
    try:
        del llm
        assert runner() is None
    finally:
        gc.enable()
