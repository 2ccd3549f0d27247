"""The offline front end: prompt forms, sampling behaviour, chat, and bad input."""

from __future__ import annotations

import pytest
import torch

from parallm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama3")), dtype="float32", device="cpu", max_model_len=256)


def _text(llm: LLM, prompt, **params) -> str:
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0].text


def test_prompt_forms_give_the_same_output(llm):
    tok = llm.get_tokenizer()
    ids = tok("Hello world")["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=8)
    as_text, as_ids, as_dict = llm.generate(
        ["Hello world", ids, {"prompt_token_ids": ids}], params, use_tqdm=False
    )
    assert as_text.prompt == "Hello world"
    assert as_text.prompt_token_ids == ids == as_ids.prompt_token_ids
    assert (
        as_text.outputs[0].token_ids == as_ids.outputs[0].token_ids == as_dict.outputs[0].token_ids
    )
    # A single list of ints is one prompt, not a batch of one-token prompts.
    assert len(llm.generate(ids, params, use_tqdm=False)) == 1


def test_outputs_come_back_in_prompt_order_with_per_prompt_params(llm, prompts):
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 7, 3, 12, 5, 2)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 7, 3, 12, 5, 2]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_seed_reproduces_alone_and_inside_a_batch(llm, prompts):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16)
    alone = llm.generate({"prompt_token_ids": prompts[2]}, params, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=16)
    batch = [{"prompt_token_ids": p} for p in prompts]
    mixed = llm.generate(batch, [others, others, params, others, others, others], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone.outputs[0].token_ids
    again = llm.generate({"prompt_token_ids": prompts[2]}, params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids


def test_top_k_one_equals_greedy(llm, prompts):
    batch = [{"prompt_token_ids": p} for p in prompts]
    greedy = llm.generate(batch, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    top1 = llm.generate(
        batch, SamplingParams(temperature=1.3, top_k=1, max_tokens=12), use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_stop_string_cuts_the_text(llm):
    full = _text(llm, "Hello", temperature=0, max_tokens=24, ignore_eos=True)
    stop = full[5:8]
    assert stop and stop not in full[:5]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    kept = _text(llm, "Hello", temperature=0, max_tokens=24, stop=[stop], ignore_eos=True,
                 include_stop_str_in_output=True)  # fmt: skip
    assert kept == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    greedy = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]  # fmt: skip
    third = greedy.token_ids[2]
    first_hit = greedy.token_ids.index(third)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[third]),
                       use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert out.token_ids == greedy.token_ids[: first_hit + 1]
    assert out.finish_reason == "stop" and out.stop_reason == third
    # min_tokens bans EOS: with EOS as the only stop, the sequence reaches min_tokens.
    eos = llm.get_tokenizer().eos_token_id
    held = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, min_tokens=10,
                                                stop_token_ids=[third]), use_tqdm=False)[0]  # fmt: skip
    assert len(held.outputs[0].token_ids) == 10 and eos not in held.outputs[0].token_ids


def test_parallel_samples_share_prompt_blocks(tiny_model_dir, prompts):
    llm = LLM(str(tiny_model_dir("llama3")), dtype="float32", device="cpu", max_model_len=256,
              enable_prefix_caching=False)  # fmt: skip
    prompt = prompts[-1]  # 150 tokens: 9 full blocks
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=4),
                 use_tqdm=False)  # fmt: skip
    stats = llm.engine.stats
    # The first sample computes the prompt; three siblings recompute only its partial last block.
    assert stats["num_prefill_tokens_computed"] == 150 + 3 * (150 - 9 * 16)
    assert stats["num_free_blocks"] == llm.engine.kv.num_blocks


def test_logprobs_top_k(llm):
    out = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False
    )
    for token, entry in zip(out[0].outputs[0].token_ids, out[0].outputs[0].logprobs, strict=True):
        assert token in entry and entry[token].rank == 1
        assert len(entry) == 3
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]


def test_chat_applies_the_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected
    assert out.prompt_token_ids == tok(expected, add_special_tokens=False)["input_ids"]


def test_stream_yields_the_same_text(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate("Hello", params, use_tqdm=False)[0].outputs[0]
    chunks = list(llm.stream("Hello", params))
    assert "".join(c.outputs[0].text for c in chunks) == full.text
    assert sum((c.outputs[0].token_ids for c in chunks), []) == full.token_ids
    assert chunks[-1].finished and chunks[-1].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", {}, "prompt must not be empty"),
        ([], {}, "prompts must not be empty"),
        ([5] * 300, {}, "max_model_len"),
        ([5, 100000], {}, "prompt_token_ids must be integers in"),
        ([5, -1], {}, "prompt_token_ids must be integers in"),
        ("hi", {"max_tokens": 0}, "max_tokens must be >= 1"),
        ("hi", {"temperature": -0.5}, "temperature must be >= 0"),
        ("hi", {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ("hi", {"top_p": 1.5}, "top_p must be in (0, 1]"),
        ("hi", {"n": 0}, "n must be >= 1"),
        ("hi", {"temprature": 1.0}, "unknown keyword"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_field(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        llm.generate(prompt, SamplingParams(**params), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_one_bad_request_rejects_the_batch_before_anything_runs(llm, prompts):
    steps = llm.engine.num_steps
    batch = [{"prompt_token_ids": p} for p in prompts[:3]] + [{"prompt_token_ids": [5] * 300}]
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(batch, SamplingParams(max_tokens=4), use_tqdm=False)
    assert llm.engine.num_steps == steps
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    ok = llm.generate(batch[:3], SamplingParams(max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in ok)


def test_bad_engine_arguments(tiny_model_dir):
    path = str(tiny_model_dir("llama3"))
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(path, device="cpu", kv_cache_mem=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(path, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        LLM(path, device="cpu").generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_stream_with_parallel_samples_reports_each_sample_once(llm):
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6)
    short = SamplingParams(n=1, temperature=0, max_tokens=2)
    engine.add_request("multi", [5, 6, 7], params, stream=True)
    engine.add_request("short", [8, 9], short, stream=True)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finishes: dict[int, int] = {0: 0, 1: 0, 2: 0}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != "multi":
                continue
            for c in out.outputs:
                tokens[c.index] += c.token_ids
                finishes[c.index] += c.finish_reason is not None
    assert all(len(t) == 6 for t in tokens.values())
    assert finishes == {0: 1, 1: 1, 2: 1}


def test_a_failing_request_fails_alone(llm, monkeypatch):
    """An exception while processing one request ends that request, not the engine."""
    engine = llm.engine
    from parallm.engine import output_processor

    original = output_processor.OutputProcessor._check_stop

    def broken(self, seq, token):
        if seq.params.seed == 99 and seq.num_output_tokens == 2:
            raise KeyError("injected")
        return original(self, seq, token)

    monkeypatch.setattr(output_processor.OutputProcessor, "_check_stop", broken)
    bad = SamplingParams(max_tokens=8, n=2, seed=99)
    engine.add_request("bad", [5, 6], bad)
    engine.add_request("good", [5, 6], SamplingParams(temperature=0, max_tokens=8))
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
    assert "injected" in results["bad"].error and results["bad"].finished
    assert results["good"].error is None and len(results["good"].outputs[0].token_ids) == 8
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate({"prompt_token_ids": [5, 6]}, bad, use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_a_cuda_index_past_the_last_device_is_refused_by_name(monkeypatch):
    """``cuda:N`` is checked against the devices this process sees, with the allowed range,
    before anything loads (shown here with torch told that one device exists)."""
    from parallm.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ValueError, match=r"device='cuda:1': this process sees 1 .* cuda:0 to cuda:0"
    ):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
