"""Text decoded in the API process (the core sends token ids only) equals what the core's own
output processing decodes: deltas, the left-out EOS / stop token, flushed bytes at the end,
aborts, decoded logprob tokens, on a byte-level and a byte-fallback tokenizer."""

from __future__ import annotations

import pytest
import torch

from parallm.engine.core.detokenize import (
    OutputDetokenizer,
    detokenizes_here,
    without_detokenization,
)
from parallm.engine.engine import LLMEngine
from parallm.llm import LLM
from parallm.outputs import RequestOutput
from parallm.sampling_params import SamplingParams

PROMPT = [40, 41, 300, 7, 255, 256, 90, 91]


@pytest.fixture(scope="module", params=["llama3", "llama2"])  # byte-level, byte fallback
def engine(request: pytest.FixtureRequest, tiny_model_dir) -> LLMEngine:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return LLM(str(tiny_model_dir(request.param)), device="cpu", kv_cache_memory=4 << 20,
                   max_model_len=256).engine  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _run(engine: LLMEngine, params: SamplingParams, abort_after: int | None) -> list[RequestOutput]:
    """Every delta of one streamed request (the last one from an abort if ``abort_after``)."""
    engine.add_request("r", PROMPT, params, stream=True)
    deltas: list[RequestOutput] = []
    steps = 0
    while engine.has_unfinished_requests():
        if abort_after is not None and steps == abort_after:
            deltas.append(engine.abort_request("r"))
            break
        deltas += engine.step()
        steps += 1
    return deltas


def _shown(deltas: list[RequestOutput]) -> list:
    """What a client sees of the deltas: text, ids, ends and decoded logprob tokens."""

    def decoded(entries):
        return None if entries is None else [
            None if e is None else {t: (lp.logprob, lp.decoded_token) for t, lp in e.items()}
            for e in entries
        ]  # fmt: skip

    return [
        (d.finished, decoded(d.prompt_logprobs),
         [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, decoded(c.logprobs))
          for c in d.outputs])
        for d in deltas
    ]  # fmt: skip


def _both_ways(engine: LLMEngine, params: SamplingParams, abort_after: int | None = None):
    in_core = _run(engine, params, abort_after)
    assert detokenizes_here(params, engine.tokenizer)
    here = OutputDetokenizer(engine.tokenizer)
    here.register("r", PROMPT, params)
    ids_only = _run(engine, without_detokenization(params), abort_after)
    assert all(c.text == "" for d in ids_only for c in d.outputs)  # the core decoded nothing
    for delta in ids_only:
        here.apply(delta)
    assert len(here) == 0  # forgotten once finished
    return _shown(in_core), _shown(ids_only)


@pytest.mark.parametrize(
    "params",
    [
        dict(n=2, seed=3, max_tokens=40, logprobs=2, prompt_logprobs=1),
        dict(temperature=0, max_tokens=30, skip_special_tokens=False, logprobs=0),
        dict(seed=5, max_tokens=60, min_tokens=5),
    ],
    ids=["n2-logprobs", "greedy-special-tokens", "sampled"],
)
def test_text_decoded_here_equals_the_cores(engine: LLMEngine, params: dict) -> None:
    in_core, here = _both_ways(engine, SamplingParams(**params))
    assert here == in_core
    assert "".join(c[1] for d in here for c in d[2])  # some text came out


def test_the_token_that_stops_a_sample_is_left_out_here_too(engine: LLMEngine) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=12)
    tokens = [t for d in _run(engine, greedy, None) for t in d.outputs[0].token_ids]
    stop = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tokens[5]])
    in_core, here = _both_ways(engine, stop)
    assert here == in_core
    assert here[-1][2][0][3:5] == ("stop", tokens[5])


def test_an_aborted_request_flushes_the_same_text(engine: LLMEngine) -> None:
    in_core, here = _both_ways(engine, SamplingParams(seed=9, max_tokens=100), abort_after=7)
    assert here == in_core and here[-1][2][0][3] == "abort"


def test_stop_strings_and_id_only_requests_stay_in_the_core() -> None:
    tokenizer = object()
    assert not detokenizes_here(SamplingParams(stop=["\n"]), tokenizer)
    assert not detokenizes_here(SamplingParams(detokenize=False), tokenizer)
    assert not detokenizes_here(SamplingParams(), None)
    params = SamplingParams(max_tokens=3)
    sent = without_detokenization(params)
    assert sent.detokenize is False and params.detokenize is True and sent.max_tokens == 3
