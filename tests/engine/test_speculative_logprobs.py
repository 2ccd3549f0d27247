"""Drafted requests may ask for logprobs: every emitted token, accepted draft or not, carries
the logprob, rank and top-k that plain decoding reports for it (float32, CPU), greedy and
seeded sampled, with n-gram drafts, with an oracle drafter whose drafts are accepted and with
layer-skip drafts, next to a request without logprobs and one with a different top-k."""

from __future__ import annotations

import random

import pytest
from test_speculative import oracle_drafts

from parallm import LLM, SamplingParams

SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
# The target's first layer, final norm and LM head draft.
LAYER_SKIP = {"method": "layer_skip", "num_layers": 1, "num_speculative_tokens": 4}
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=8 << 20, block_size=16,
              max_num_batched_tokens=64, enable_prefix_caching=True)  # fmt: skip
# A verify step's rows and a decode step's row come from float32 forwards of different shapes,
# which round differently: logprobs agree to about 1e-5 relative, not bit for bit.
TOLERANCE = 1e-5


def _repetitive_prompts(ordinary_token_ids: list[int]) -> list[list[int]]:
    """Prompts that repeat short patterns (prompt lookup finds matches), one plain."""
    rng = random.Random(11)
    pattern = rng.choices(ordinary_token_ids, k=5)
    return [pattern * 6, rng.choices(ordinary_token_ids, k=20) + pattern * 3,
            rng.choices(ordinary_token_ids, k=12)]  # fmt: skip


def _generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_same_logprobs(got, want) -> None:
    if want.logprobs is None:  # a request that did not ask
        assert got.logprobs is None and got.cumulative_logprob is None
        return
    assert len(got.logprobs) == len(want.logprobs) == len(want.token_ids)
    for position, (g, w) in enumerate(zip(got.logprobs, want.logprobs, strict=True)):
        assert set(g) == set(w), position  # the chosen token and the same top-k ids
        for token, expected in w.items():
            assert g[token].rank == expected.rank, (position, token)
            close = pytest.approx(expected.logprob, rel=TOLERANCE, abs=TOLERANCE)
            assert g[token].logprob == close, (position, token)
    total = pytest.approx(want.cumulative_logprob, rel=TOLERANCE, abs=TOLERANCE)
    assert got.cumulative_logprob == total


@pytest.mark.parametrize("drafter", ["ngram", "oracle", "layer_skip"])
# Sampled with a small top-k, so that n-gram drafts of a tiny random model get accepted too.
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.5, "top_k": 2}],
                         ids=["greedy", "sampled"])  # fmt: skip
def test_drafted_requests_report_plain_decodings_logprobs(
    drafter, sampling, tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    prompts = _repetitive_prompts(ordinary_token_ids)
    # Next to each other in every step: top-3, no logprobs, top-1.
    params = [SamplingParams(**sampling, max_tokens=64, ignore_eos=True, seed=3, logprobs=k)
              for k in (3, None, 1)]  # fmt: skip
    plain = _generate(LLM(path, **ENGINE), prompts, params)
    if drafter == "oracle":
        oracle_drafts(monkeypatch, {tuple(p): list(o.token_ids)
                                     for p, o in zip(prompts, plain, strict=True)})  # fmt: skip
    spec = SPEC if drafter != "layer_skip" else LAYER_SKIP
    llm = LLM(path, speculative_config=spec, **ENGINE)
    accepted = _count_accepted_drafts_of_logprobs_requests(llm)
    free = llm.engine.kv.num_free_blocks
    got = _generate(llm, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    for g, w in zip(got, plain, strict=True):
        _assert_same_logprobs(g, w)
    # Drafts of the requests with logprobs were kept: their later tokens came from verify rows.
    assert accepted["logprobs"] > 0 and llm.engine.stats["spec_accepted_tokens"] > 0
    assert llm.engine.kv.num_free_blocks == free


def _count_accepted_drafts_of_logprobs_requests(llm: LLM) -> dict[str, int]:
    """A running count of the drafts that verify steps kept for requests with logprobs."""
    engine, counts = llm.engine, {"logprobs": 0}
    append_verified = engine._append_verified

    def counting(batch, sampled, result):
        for seq, tokens in zip(sampled, result.spec_token_ids, strict=True):
            if seq.params.logprobs is not None:
                counts["logprobs"] += len(tokens) - 1
        return append_verified(batch, sampled, result)

    engine._append_verified = counting
    return counts
