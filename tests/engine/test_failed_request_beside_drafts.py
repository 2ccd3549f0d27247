"""A request that fails in a step that verifies another request's drafts ends alone: the
drafted request keeps its verified tokens, its rejected drafts' KV slots come back, and the
engine serves on with plain decoding's output."""

from __future__ import annotations

import random

from test_speculative import ENGINE, SPEC

from parallm import LLM, SamplingParams
from parallm.engine import output_processor
from parallm.engine.spec import drafting


def test_a_prompt_logprobs_failure_beside_a_verify_step_leaves_the_drafts_intact(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    rng = random.Random(7)
    drafted, failing = rng.choices(ordinary_token_ids, k=30), rng.choices(ordinary_token_ids, k=10)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = LLM(path, **ENGINE).generate([{"prompt_token_ids": drafted}], greedy, use_tqdm=False)
    future = plain[0].outputs[0].token_ids

    def oracle(self, running):  # plain decoding's next 4 tokens, the third wrong
        for seq in running:
            if seq.request_id == "drafted" and drafting.draftable(seq):
                drafts = list(future[seq.num_output_tokens : seq.num_output_tokens + 4])
                if len(drafts) >= 3:
                    drafts[2] = (drafts[2] + 1) % 50
                seq.draft_token_ids = drafts

    record = output_processor.OutputProcessor._record_prompt_scores

    def record_or_fail(self, seq, scores):
        if seq.request_id == "failing":
            raise RuntimeError("prompt logprobs could not be recorded")
        return record(self, seq, scores)

    monkeypatch.setattr(drafting.Drafter, "propose", oracle)
    monkeypatch.setattr(output_processor.OutputProcessor, "_record_prompt_scores", record_or_fail)
    engine = LLM(path, speculative_config=SPEC, **ENGINE).engine
    free = engine.kv.num_free_blocks
    engine.add_request("drafted", drafted, greedy)
    outputs = {}
    while engine.requests["drafted"].seqs[0].num_output_tokens < 3:
        outputs.update((o.request_id, o) for o in engine.step())
    # Its prompt's only chunk samples in the same step as the drafted request's verify.
    engine.add_request("failing", failing, SamplingParams(max_tokens=3, prompt_logprobs=1))
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs["failing"].outputs[0].finish_reason == "error"
    assert outputs["drafted"].outputs[0].token_ids == future
    assert engine.spec_stats.accepted_tokens > 0
    assert engine.kv.num_free_blocks == free
