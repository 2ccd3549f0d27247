"""A draft model's sampled drafts, verified by speculative sampling, through the whole engine
(float32, CPU, tiny random models).

The target samples with top_k=4, so each position has four possible tokens and the exact
distribution of a request's first four tokens has 256 outcomes, computed from a plain
engine's logprobs. The draft is the target with noise added to every weight, so its ``q``
is close to the target's ``p`` but not equal: runs of drafts are accepted and many are
rejected. Thousands of seeded requests must emit that distribution (Pearson's chi-square
test per position and for consecutive pairs), and the same check must fail when the engine
keeps every draft. Seeded requests reproduce on a fresh engine, and logprobs of every emitted
token are the target's.
"""

from __future__ import annotations

import itertools
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_rejection import ALPHA, chi_square_p_value

from parallm import LLM, SamplingParams
from parallm.engine.spec import verify as verify_module

ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=64 << 20, block_size=16,
              max_num_batched_tokens=1024, enable_prefix_caching=True)  # fmt: skip
TOP_K = 4
TEMPERATURE = 1.5  # flatter than the tiny models' own distributions
LENGTH = 4  # tokens per request whose joint distribution is known
N_REQUESTS = 4000


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    """The target, and a draft that is the target with every weight perturbed."""
    target = Path(tiny_model_dir("qwen3"))
    draft = tmp_path_factory.mktemp("noisy-qwen3")
    shutil.copytree(target, draft, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for path in draft.glob("*.safetensors"):
        weights = load_file(path)
        noisy = {name: w + 0.03 * w.std() * torch.randn(w.shape, generator=gen)
                 if w.numel() > 1 else w for name, w in weights.items()}  # fmt: skip
        save_file({k: v.contiguous() for k, v in noisy.items()}, path, metadata={"format": "pt"})
    return str(target), str(draft)


def _spec(draft: str) -> dict:
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}


def _sampled(seed: int, **overrides) -> SamplingParams:
    knobs = dict(temperature=TEMPERATURE, top_k=TOP_K, seed=seed, max_tokens=LENGTH,
                 ignore_eos=True)  # fmt: skip
    return SamplingParams(**(knobs | overrides))


def _generate(llm: LLM, prompts: list[list[int]], params) -> list:
    batch = [{"prompt_token_ids": p} for p in prompts]
    return [o.outputs[0] for o in llm.generate(batch, params, use_tqdm=False)]


def exact_distribution(llm: LLM, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """Probability of every possible first ``LENGTH`` tokens: at each position the softmax of
    the top-4 raw logprobs of a plain engine over the temperature (as top_k and temperature
    act on the logits, which differ from the logprobs by a constant)."""
    probe = SamplingParams(temperature=0, max_tokens=1, logprobs=TOP_K)
    dist = {(): 1.0}
    for _ in range(LENGTH):
        prefixes = list(dist)
        outs = _generate(llm, [prompt + list(p) for p in prefixes], probe)
        grown = {}
        for prefix, out in zip(prefixes, outs, strict=True):
            top = out.logprobs[0]
            tokens = sorted(top, key=lambda t: top[t].logprob, reverse=True)[:TOP_K]
            logprobs = torch.tensor([top[t].logprob for t in tokens], dtype=torch.float64)
            probs = (logprobs / TEMPERATURE).softmax(dim=0).tolist()
            for token, prob in zip(tokens, probs, strict=True):
                grown[prefix + (token,)] = dist[prefix] * prob
        dist = grown
    return dist


def _check(counts: Counter, probs: dict, total: int) -> float:
    """Chi-square p-value of ``counts`` (of ``total`` draws) against ``probs`` over the union of
    their outcomes, the outcomes expected fewer than 5 times pooled into one cell (so that
    every cell has the draws the test needs)."""
    keys = set(counts) | set(probs)
    rare = {k for k in keys if 0 < probs.get(k, 0.0) * total < 5}
    common = sorted(keys - rare)
    cells = [counts[k] for k in common] + [sum(counts[k] for k in rare)]
    cell_probs = [probs.get(k, 0.0) for k in common] + [sum(probs[k] for k in rare)]
    return chi_square_p_value(torch.tensor(cells), torch.tensor(cell_probs, dtype=torch.float64))


def p_values(outputs: list[list[int]], dist: dict[tuple[int, ...], float]) -> dict[str, float]:
    """Each position's marginal and each pair of consecutive positions against ``dist``."""
    windows = [(j,) for j in range(LENGTH)] + [(j, j + 1) for j in range(LENGTH - 1)]
    out = {}
    for window in windows:
        expected = Counter()
        for seq, prob in dist.items():
            expected[tuple(seq[j] for j in window)] += prob
        counts = Counter(tuple(o[j] for j in window) for o in outputs)
        out[f"positions {window}"] = _check(counts, dict(expected), len(outputs))
    return out


def _sample_many(llm: LLM, prompt: list[int]) -> list[list[int]]:
    outs = _generate(llm, [prompt] * N_REQUESTS, [_sampled(i) for i in range(N_REQUESTS)])
    return [list(o.token_ids) for o in outs]


def keep_every_draft(probs, draft_token_ids, draft_probs, generator):
    """Wrong: accepts every draft, then a bonus token from p_k."""
    bonus = torch.multinomial(probs[len(draft_token_ids)], 1, generator=generator)
    return list(draft_token_ids) + bonus.tolist()


@pytest.mark.parametrize("verifier", ["speculative_sampling", "keep_every_draft"])
def test_emitted_tokens_have_the_targets_distribution(
    verifier, models, ordinary_token_ids, monkeypatch
):
    target, draft = models
    prompt = ordinary_token_ids[10:17]
    dist = exact_distribution(LLM(target, **ENGINE), prompt)
    assert len(dist) == TOP_K**LENGTH and sum(dist.values()) == pytest.approx(1.0)
    if verifier == "keep_every_draft":
        monkeypatch.setattr(verify_module, "rejection_sample", keep_every_draft)
    llm = LLM(target, speculative_config=_spec(draft), **ENGINE)
    outputs = _sample_many(llm, prompt)
    stats = llm.engine.stats
    failed = {name: pv for name, pv in p_values(outputs, dist).items() if pv < ALPHA}
    if verifier == "keep_every_draft":
        assert failed, "the distribution check passed an engine that keeps every draft"
        return
    assert not failed, f"emitted tokens are not distributed as the target: {failed}"
    # Drafts are accepted often and rejected often: both paths are exercised.
    assert 0.3 < stats["spec_accepted_tokens"] / stats["spec_draft_tokens"] < 0.9, stats


def test_seeded_requests_reproduce_on_a_fresh_engine(models, ordinary_token_ids):
    """The same seeds give the same tokens on another engine of the same configuration;
    other seeds give others; and the tokens are not plain decoding's (another random stream)."""
    target, draft = models
    prompts = [ordinary_token_ids[i : i + 9] for i in range(0, 60, 5)]
    params = [_sampled(i, max_tokens=24) for i in range(len(prompts))]

    def run(params, spec=True):
        llm = LLM(target, speculative_config=_spec(draft) if spec else None, **ENGINE)
        return [list(o.token_ids) for o in _generate(llm, prompts, params)], llm.engine.stats

    first, stats = run(params)
    assert stats["spec_draft_tokens"] > 0
    assert run(params)[0] == first
    reseeded = [_sampled(i + 100, max_tokens=24) for i in range(len(prompts))]
    assert run(reseeded)[0] != first
    assert run(params, spec=False)[0] != first


def test_logprobs_of_emitted_tokens_are_the_targets(models, ordinary_token_ids):
    """Every emitted token's logprob and top-2 come from the target's raw logits at its
    position, as a plain engine scores the same tokens as a prompt."""
    target, draft = models
    prompts = [ordinary_token_ids[i : i + 6] for i in range(0, 40, 8)]
    params = [_sampled(i, max_tokens=16, logprobs=2) for i in range(len(prompts))]
    llm = LLM(target, speculative_config=_spec(draft), **ENGINE)
    outs = _generate(llm, prompts, params)
    assert llm.engine.stats["spec_accepted_tokens"] > 0
    scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    rescored = _generate_prompt_logprobs(LLM(target, **ENGINE), prompts, outs, scoring)
    for prompt, out, scores in zip(prompts, outs, rescored, strict=True):
        for j, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            expected = scores[len(prompt) + j]
            assert entry[token].logprob == pytest.approx(expected[token].logprob, abs=1e-4)
            top = sorted(entry, key=lambda t: entry[t].logprob, reverse=True)[:2]
            want = sorted(expected, key=lambda t: expected[t].logprob, reverse=True)[:2]
            assert top == want


def _generate_prompt_logprobs(llm: LLM, prompts, outs, params) -> list:
    batch = [
        {"prompt_token_ids": p + list(o.token_ids)} for p, o in zip(prompts, outs, strict=True)
    ]
    return [r.prompt_logprobs for r in llm.generate(batch, params, use_tqdm=False)]


def test_greedy_requests_with_a_sampling_draft_model_are_plain_decodings(
    models, ordinary_token_ids
):
    """Greedy requests keep argmax drafts and exact-match verification: plain decoding's
    tokens, while sampled requests beside them draft by sampling."""
    target, draft = models
    prompts = [ordinary_token_ids[i : i + 7] for i in range(0, 70, 7)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = [greedy if i % 2 else _sampled(i, max_tokens=20) for i in range(len(prompts))]
    plain = _generate(LLM(target, **ENGINE), prompts[1::2], greedy)
    llm = LLM(target, speculative_config=_spec(draft), **ENGINE)
    outs = _generate(llm, prompts, params)
    assert [o.token_ids for o in outs[1::2]] == [o.token_ids for o in plain]
    assert llm.engine.stats["spec_accepted_tokens"] > 0
    assert len(list(itertools.chain(*(o.token_ids for o in outs)))) == 20 * len(prompts)
