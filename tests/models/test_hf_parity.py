"""The engine on CPU in float32 against transformers: same greedy tokens, logprobs within 1e-4.

Every scheduling path must leave the numbers unchanged: one-shot prefill, chunked prefill,
prefix-cache hits and preemption with recompute. Loading variants (sharded checkpoints, 4.x RoPE
config keys) must too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny_models import ARCHS, hf_greedy

from parallm import LLM, SamplingParams

BLOCK_SIZE = 16
MAX_TOKENS = 32
LOGPROB_ATOL = 1e-4
KV_CACHE_BYTES = 16 << 20
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)

Completions = tuple[list[list[int]], list[list[float]]]


def make_llm(path: Path, **overrides: Any) -> LLM:
    """A CPU float32 engine; one-shot prefill and no prefix caching unless overridden."""
    kwargs: dict[str, Any] = {
        "dtype": "float32",
        "device": "cpu",
        "kv_cache_memory": KV_CACHE_BYTES,
        "block_size": BLOCK_SIZE,
        "max_num_batched_tokens": 1024,
        "max_num_seqs": 16,
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }
    kwargs.update(overrides)
    return LLM(model=str(path), **kwargs)


def run_greedy(llm: LLM, prompts: list[list[int]]) -> Completions:
    """Greedy tokens and the chosen tokens' logprobs for each prompt."""
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], GREEDY, use_tqdm=False)
    tokens, logprobs = [], []
    for out in outs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        assert completion.logprobs is not None and len(completion.logprobs) == len(ids)
        tokens.append(ids)
        logprobs.append([lp[t].logprob for t, lp in zip(ids, completion.logprobs, strict=True)])
    return tokens, logprobs


def assert_matches_hf(path: Path, prompts: list[list[int]], got: Completions) -> None:
    hf_tokens, hf_logprobs = hf_greedy(path, prompts, MAX_TOKENS)
    tokens, logprobs = got
    for i, prompt in enumerate(prompts):
        where = f"prompt {i} ({len(prompt)} tokens)"
        assert tokens[i] == hf_tokens[i], (
            f"{where}: tokens differ at {_first_diff(tokens[i], hf_tokens[i])}"
        )
        err = max(abs(a - b) for a, b in zip(logprobs[i], hf_logprobs[i], strict=True))
        assert err <= LOGPROB_ATOL, f"{where}: logprobs differ by up to {err:.2e}"


def _first_diff(a: list[int], b: list[int]) -> int:
    return next(
        (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def stat_delta(llm: LLM, name: str, run: Callable[[], Completions]) -> tuple[Completions, float]:
    """Run ``run`` and report how much the engine counter ``name`` grew meanwhile."""
    before = llm.engine.stats[name]
    result = run()
    return result, llm.engine.stats[name] - before


def kv_bytes_for_blocks(path: Path, num_blocks: int) -> int:
    """Bytes of a float32 KV cache with ``num_blocks`` blocks for the checkpoint at ``path``."""
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_block = (
        BLOCK_SIZE * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    )
    return num_blocks * per_block


@pytest.fixture(scope="module")
def default_llm(tiny_model_dir: Callable[..., Path]) -> Iterator[Callable[[str], LLM]]:
    """``default_llm(arch)``: one default engine per arch, shared by this module's tests."""
    engines: dict[str, LLM] = {}

    def get(arch: str) -> LLM:
        if arch not in engines:
            engines[arch] = make_llm(tiny_model_dir(arch))
        return engines[arch]

    yield get
    engines.clear()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(arch: str, default_llm, tiny_model_dir, prompts) -> None:
    assert_matches_hf(tiny_model_dir(arch), prompts, run_greedy(default_llm(arch), prompts))


@pytest.mark.parametrize("arch", ["llama2", "qwen3"])
def test_chunked_prefill_matches_hf(arch: str, tiny_model_dir, prompts) -> None:
    """A 32-token step budget splits the 150-token prompt over several steps."""
    path = tiny_model_dir(arch)
    llm = make_llm(path, max_num_batched_tokens=32, max_num_seqs=8)
    assert_matches_hf(path, prompts, run_greedy(llm, prompts))


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_prefix_cache_hits_match_hf(arch: str, tiny_model_dir, ordinary_token_ids) -> None:
    """Prompts sharing 70 tokens: the second wave reuses the first wave's 4 full blocks."""
    rng = random.Random(7)
    shared = rng.choices(ordinary_token_ids, k=70)
    prompts = [shared + rng.choices(ordinary_token_ids, k=n) for n in (3, 10, 26, 41)]
    path = tiny_model_dir(arch)
    llm = make_llm(path, enable_prefix_caching=True)

    first = run_greedy(llm, prompts[:1])
    second, hits = stat_delta(
        llm, "num_prefix_cache_hit_tokens", lambda: run_greedy(llm, prompts[1:])
    )

    assert hits >= (len(shared) // BLOCK_SIZE) * BLOCK_SIZE * len(prompts[1:])
    assert_matches_hf(path, prompts[:1], first)
    assert_matches_hf(path, prompts[1:], second)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_preemption_matches_hf(arch: str, tiny_model_dir, ordinary_token_ids) -> None:
    """Eight prompts of 3 blocks that grow to 5 each, in a 16-block cache: some get preempted.

    Whatever the admission details (and a block more or less of slack), the running sequences
    outgrow the cache long before they finish, and each alone fits.
    """
    rng = random.Random(5)
    prompts = [rng.choices(ordinary_token_ids, k=n) for n in (33, 35, 38, 40, 42, 44, 46, 47)]
    path = tiny_model_dir(arch)
    kv_bytes = kv_bytes_for_blocks(path, 16)
    llm = make_llm(path, kv_cache_memory=kv_bytes, max_model_len=128)
    got = run_greedy(llm, prompts)
    assert llm.engine.stats["num_preemptions"] > 0
    assert_matches_hf(path, prompts, got)


def test_sharded_checkpoint_matches_hf(tiny_model_dir, prompts) -> None:
    """Tied embeddings (no lm_head in the files) spread over several safetensors shards."""
    path = tiny_model_dir("llama3", sharded=True)
    assert (path / "model.safetensors.index.json").exists()
    assert not (path / "model.safetensors").exists()
    assert_matches_hf(path, prompts, run_greedy(make_llm(path), prompts))


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_legacy_rope_keys_match_hf(arch: str, tiny_model_dir, prompts) -> None:
    """transformers 4.x configs: top-level rope_theta and rope_scaling, no rope_parameters."""
    path = tiny_model_dir(arch, legacy_rope_keys=True)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg and "rope_scaling" in cfg
    assert_matches_hf(path, prompts, run_greedy(make_llm(path), prompts))


def test_prefix_cache_skips_prefill_work(tiny_model_dir, ordinary_token_ids) -> None:
    """The same 100-token prompt twice: the second time its 6 full blocks come from the cache."""
    prompt = random.Random(11).choices(ordinary_token_ids, k=100)
    llm = make_llm(tiny_model_dir("llama2"), enable_prefix_caching=True)
    name = "num_prefill_tokens_computed"

    first, computed_first = stat_delta(llm, name, lambda: run_greedy(llm, [prompt]))
    second, computed_second = stat_delta(llm, name, lambda: run_greedy(llm, [prompt]))

    full_block_tokens = (len(prompt) // BLOCK_SIZE) * BLOCK_SIZE
    assert computed_first - computed_second >= full_block_tokens
    assert second[0] == first[0]
    assert max(abs(a - b) for a, b in zip(second[1][0], first[1][0], strict=True)) <= LOGPROB_ATOL


def test_parallel_samples(default_llm, prompts) -> None:
    """n=3 gives three distinct seeded samples, the same ones again on a rerun."""
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=8, ignore_eos=True)
    llm = default_llm("llama2")

    def sample() -> list[list[int]]:
        (out,) = llm.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)
        assert sorted(c.index for c in out.outputs) == [0, 1, 2]
        return [list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)]

    samples = sample()
    assert all(len(s) == 8 for s in samples)
    assert len({tuple(s) for s in samples}) > 1
    assert sample() == samples


@pytest.mark.parametrize("arch", ARCHS)
def test_head_dim_128_matches_hf(arch: str, tiny_model_dir, prompts) -> None:
    """The families at the head size of their real checkpoints (Qwen3, Llama 3 8B, Mistral)."""
    path = tiny_model_dir(arch, head_dim=128)
    short = prompts[:3]
    assert_matches_hf(path, short, run_greedy(make_llm(path), short))
