"""``prompt_logprobs``: every prompt token's logprob, rank and top-k alternatives, against a
transformers forward over the prompt (tiny random models, float32, CPU), whatever the scheduling:
one-shot prefill, chunked prefill, prefix caching, preemption; and in the completions API."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from parallm import LLM, SamplingParams
from parallm.engine.scheduler import Scheduler
from parallm.outputs import PromptLogprobs
from parallm.server.app import build_app
from parallm.server.launcher import ServerThread, load_engine

BLOCK_SIZE = 16
TOP_K = 3
ATOL = 1e-4
ENGINE: dict[str, Any] = {
    "dtype": "float32",
    "device": "cpu",
    "kv_cache_memory": 16 << 20,
    "block_size": BLOCK_SIZE,
    "max_num_batched_tokens": 1024,
    "max_num_seqs": 16,
    "enable_prefix_caching": False,
    "enforce_eager": True,
    "max_model_len": 256,
}
PARAMS = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=TOP_K)


@functools.lru_cache(maxsize=4)
def _hf_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_prompt_logprobs(path: Path, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over the prompt: row p scores token p + 1."""
    with torch.no_grad():
        logits = _hf_model(str(path))(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def assert_matches_hf(path: Path, prompt: list[int], got: PromptLogprobs | None, k: int) -> None:
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    reference = hf_prompt_logprobs(path, prompt)
    for i in range(1, len(prompt)):
        row, token, entry = reference[i - 1], prompt[i], got[i]
        where = f"prompt token {i} of {len(prompt)}"
        assert token in entry, where
        assert abs(entry[token].logprob - row[token].item()) <= ATOL, where
        assert entry[token].rank == int((row > row[token]).sum()) + 1, where
        top = torch.topk(row, k)
        ranked = {t: lp for t, lp in entry.items() if lp.rank is not None and lp.rank <= k}
        assert set(ranked) == set(top.indices.tolist()), where
        for value, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            assert abs(ranked[t].logprob - value) <= ATOL, where
        assert set(entry) <= set(ranked) | {token}, where


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = PARAMS) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module")
def llama3(tiny_model_dir) -> Path:
    return tiny_model_dir("llama3")


# ---- the offline API -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_prompt_logprobs_match_hf(arch, tiny_model_dir, prompts):
    path = tiny_model_dir(arch)
    llm = LLM(str(path), **ENGINE)
    outs = generate(llm, prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_hf(path, prompt, out.prompt_logprobs, TOP_K)
        assert len(out.outputs[0].token_ids) == 2


def test_prompt_logprobs_zero_gives_the_prompt_token_only(llama3, prompts):
    llm = LLM(str(llama3), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    (out,) = generate(llm, [prompts[3]], params)
    assert_matches_hf(llama3, prompts[3], out.prompt_logprobs, 0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])
    (plain,) = generate(llm, [prompts[3]], SamplingParams(temperature=0, max_tokens=1))
    assert plain.prompt_logprobs is None


@pytest.mark.parametrize("budget", [16, 7])
def test_chunked_prefill(llama3, prompts, budget):
    """A step budget of 16 or 7 tokens splits every prompt over many chunks (7 also makes
    chunks of one token that score the next prompt token)."""
    llm = LLM(str(llama3), **{**ENGINE, "max_num_batched_tokens": budget, "max_num_seqs": 4})
    outs = generate(llm, prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_hf(llama3, prompt, out.prompt_logprobs, TOP_K)


def test_prefix_caching_recomputes_a_cached_prefix(llama3, ordinary_token_ids):
    """A shared 70-token prefix is cached by the first prompt; a prompt with prompt_logprobs
    takes no hits (the cached positions have no logits), one without still does."""
    rng = random.Random(3)
    shared = rng.choices(ordinary_token_ids, k=70)
    first, scored, plain = (shared + rng.choices(ordinary_token_ids, k=n) for n in (5, 9, 12))
    llm = LLM(str(llama3), **{**ENGINE, "enable_prefix_caching": True})
    generate(llm, [first], SamplingParams(temperature=0, max_tokens=2))

    hits = llm.engine.stats["num_prefix_cache_hit_tokens"]
    (out,) = generate(llm, [scored])
    assert llm.engine.stats["num_prefix_cache_hit_tokens"] == hits
    assert out.num_cached_tokens == 0
    assert_matches_hf(llama3, scored, out.prompt_logprobs, TOP_K)

    generate(llm, [plain], SamplingParams(temperature=0, max_tokens=2))
    full_blocks = len(shared) // BLOCK_SIZE * BLOCK_SIZE
    assert llm.engine.stats["num_prefix_cache_hit_tokens"] - hits >= full_blocks


def test_parallel_samples_share_one_prompt_scoring(llama3, prompts):
    llm = LLM(str(llama3), **{**ENGINE, "max_num_batched_tokens": 32})
    params = SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=4, prompt_logprobs=TOP_K)
    (out,) = generate(llm, [prompts[4]], params)
    assert len(out.outputs) == 3
    assert_matches_hf(llama3, prompts[4], out.prompt_logprobs, TOP_K)


def test_preemption_while_scoring_the_prompt(llama3, ordinary_token_ids, monkeypatch):
    """Six 40-token prompts that grow by 30 tokens in an 11-block cache with 16-token steps:
    some are preempted half-scored and recomputed; each token is scored once and matches."""
    preempted_mid_prompt = []
    preempt = Scheduler._preempt

    def watching(self, seq, batch):
        preempted_mid_prompt.append(seq.wants_prompt_logprobs and len(seq.prompt_logprobs) > 1)
        preempt(self, seq, batch)

    monkeypatch.setattr(Scheduler, "_preempt", watching)
    rng = random.Random(9)
    prompts = [rng.choices(ordinary_token_ids, k=40) for _ in range(6)]
    # 12 blocks of 16 tokens x (K, V) x 2 layers x 2 kv heads x head_dim 16 x 4 bytes (one
    # block is kept back as scratch).
    kv_bytes = 12 * BLOCK_SIZE * 2 * 2 * 2 * 16 * 4
    llm = LLM(str(llama3), **{**ENGINE, "kv_cache_memory": kv_bytes, "max_num_batched_tokens": 16,
                              "max_model_len": 128})  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_logprobs=TOP_K)
    outs = generate(llm, prompts, params)
    assert any(preempted_mid_prompt)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_hf(llama3, prompt, out.prompt_logprobs, TOP_K)


def test_stream_carries_prompt_logprobs_once(llama3, prompts):
    llm = LLM(str(llama3), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    deltas = list(llm.stream({"prompt_token_ids": prompts[2]}, params))
    assert len(deltas) > 1
    assert_matches_hf(llama3, prompts[2], deltas[0].prompt_logprobs, 1)
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_decoded_tokens_follow_detokenize(llama3, prompts):
    llm = LLM(str(llama3), **ENGINE)
    tokenizer = llm.get_tokenizer()
    (out,) = generate(llm, [prompts[2]])
    for entry in out.prompt_logprobs[1:]:
        for token, lp in entry.items():
            assert lp.decoded_token == tokenizer.decode([token])
    quiet = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2, detokenize=False)
    (out,) = generate(llm, [prompts[2]], quiet)
    assert all(lp.decoded_token is None for e in out.prompt_logprobs[1:] for lp in e.values())


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_is_refused(value):
    with pytest.raises(ValueError, match=r"^prompt_logprobs must be"):
        SamplingParams(prompt_logprobs=value)


# ---- the completions API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama3) -> Iterator[ServerThread]:
    engine = load_engine(model=str(llama3), **ENGINE)
    with ServerThread(build_app(engine, "tiny", log_stats=False)) as server:
        yield server


def complete(server: ServerThread, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=60)


def test_completions_return_prompt_logprobs(server, llama3, prompts):
    prompt = prompts[3]
    response = complete(server, prompt=prompt, max_tokens=2, n=2, prompt_logprobs=TOP_K)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 2
    for choice in choices:
        entries = choice["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(prompt)
        # JSON keys are token ids as strings; values are vLLM's {logprob, rank, decoded_token}.
        parsed = [None] + [
            {int(t): _Logprob(**v) for t, v in entry.items()} for entry in entries[1:]
        ]
        assert all(set(v) == {"logprob", "rank", "decoded_token"}
                   for entry in entries[1:] for v in entry.values())  # fmt: skip
        assert_matches_hf(llama3, prompt, parsed, TOP_K)


def test_completions_without_prompt_logprobs_have_none(server, prompts):
    response = complete(server, prompt=prompts[2], max_tokens=2)
    assert response.status_code == 200
    assert response.json()["choices"][0]["prompt_logprobs"] is None


def test_completions_several_prompts_each_get_their_own(server, llama3, prompts):
    batch = [prompts[1], prompts[4]]
    response = complete(server, prompt=batch, max_tokens=1, prompt_logprobs=1)
    assert response.status_code == 200, response.text
    for prompt, choice in zip(batch, response.json()["choices"], strict=True):
        parsed = [None] + [
            {int(t): _Logprob(**v) for t, v in e.items()} for e in choice["prompt_logprobs"][1:]
        ]
        assert_matches_hf(llama3, prompt, parsed, 1)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt_logprobs": 21},
        {"prompt_logprobs": -1},
        {"prompt_logprobs": "2"},
        {"prompt_logprobs": 2, "stream": True},
    ],
    ids=["too many", "negative", "a string", "with stream"],
)
def test_bad_prompt_logprobs_is_400_naming_it(server, body):
    response = complete(server, prompt=[1, 2, 3], max_tokens=1, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt_logprobs"


class _Logprob:
    """A JSON prompt-logprob value as the offline ``Logprob`` (logprob, rank, decoded_token)."""

    def __init__(self, logprob: float, rank: int | None, decoded_token: str | None) -> None:
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token
