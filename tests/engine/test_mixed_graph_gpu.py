"""Mixed graphs on CUDA: steps that carry prompt tokens, replayed, give the tokens of the same
static buffers run uncaptured (bf16 and fp16, two model families: only capture and replay are
under test, the kernels and rows being the same), and in float32 the tokens of an engine that
runs every such step eagerly (the tile-table launch and its padding against the plain launch).
The layout against the eager step is checked on CPU (tests/engine/test_mixed_graph.py)."""

from __future__ import annotations

import random

import pytest
from arrivals import run_arrivals

from parallm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _llm(path: str, dtype: str, **kwargs) -> LLM:
    # A 64-token budget chunks the longer prompts, so most steps carry prompt tokens beside
    # decoding sequences; no prefix caching: both runs compute the same prefill rows.
    return LLM(path, dtype=dtype, device="cuda", kv_cache_memory=64 << 20, max_num_seqs=8,
               max_num_batched_tokens=64, enable_chunked_prefill=True,
               enable_prefix_caching=False, cuda_graph_sizes=(1, 2, 4, 8), **kwargs)  # fmt: skip


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 150))] for _ in range(7)]


def _tokens(llm: LLM) -> list[list[int]]:
    prompts = _prompts(llm.engine.model_config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_replays_give_the_uncaptured_buffers_tokens(tiny_model_dir, dtype, family):
    llm = _llm(str(tiny_model_dir(family)), dtype)
    runner = llm.engine.runner
    graphs = runner.mixed_graphs
    assert graphs is not None and graphs.captures and set(graphs.graphs) == set(graphs.sizes)
    replayed = _tokens(llm)
    assert graphs.num_replays >= 5, graphs.num_replays
    runner.capture_mixed_graphs(graphs.sizes, 8, llm.engine.max_model_len, capture=False)
    assert _tokens(llm) == replayed
    assert runner.mixed_graphs.num_replays == graphs.num_replays


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_float32_replays_give_the_eager_engines_tokens(tiny_model_dir, family):
    path = str(tiny_model_dir(family))
    graphed = _llm(path, "float32")
    tokens = _tokens(graphed)
    assert graphed.engine.runner.mixed_graphs.num_replays >= 5
    eager = _llm(path, "float32", enforce_eager=True)
    assert eager.engine.runner.mixed_graphs is None
    assert _tokens(eager) == tokens


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_prompts_admitted_ahead_replay_to_the_synchronous_engines_tokens(tiny_model_dir, family):
    """Prompts arriving mid-decode join the step launched ahead (async scheduling, the CUDA
    default): captured mixed graphs whose decode rows take their ids from the device. In
    float32 the tokens are those of the synchronous engine, and every step but the first and
    those after a prompt chunk that samples nothing runs ahead."""
    path = str(tiny_model_dir(family))
    fast = _llm(path, "float32")
    assert fast.engine.async_scheduling
    vocab = fast.engine.model_config.vocab_size
    prompts = _prompts(vocab)
    queue, at = prompts[:5], [0, 2, 3, 5, 8]
    want, _, _ = run_arrivals(_llm(path, "float32", async_scheduling=False), queue,
                              [GREEDY] * 5, at)  # fmt: skip
    replays = fast.engine.runner.mixed_graphs.num_replays
    got, steps, ahead = run_arrivals(fast, queue, [GREEDY] * 5, at)
    assert got == want
    assert fast.engine.runner.mixed_graphs.num_replays - replays >= 4
    assert steps // 2 < ahead < steps, (ahead, steps)
