"""The Triton paths give the PyTorch path's tokens and logprobs (Triton interpreter on CPU):
the Triton attention backend (rotary and KV store in its kernels), then the Triton norm and
activation layers swapped in, then batch-1 decode rows through the one-row kernel chain.
Runs in a subprocess because TRITON_INTERPRET must be set before triton is first imported.
"""

from __future__ import annotations

import textwrap

import pytest
from interpreted_engine import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton_interpreter  # before triton: lists its builtins once (speed)
    from collections import Counter
    from interpreted_engine import assert_same_tokens_and_logprobs, use_one_row_chain
    from parallm import LLM, SamplingParams
    from parallm.engine.one_row_step import supports_one_row_step
    from parallm.kernels import paged_decode, paged_prefill, rope_store
    from parallm.layers.backends import TritonAttention
    from parallm.layers.triton_layers import use_triton_layers

    calls = Counter()
    def counted(module, name):
        fn = getattr(module, name)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        setattr(module, name, wrapper)
    for name in ("rotary_and_store_kv",):
        counted(rope_store, name)
    counted(paged_decode, "paged_decode_attention")
    counted(paged_prefill, "paged_prefill_attention")

    llm = LLM(sys.argv[1], device="cpu", max_model_len=128)
    prompts = [{"prompt_token_ids": [5 + i for i in range(n)]} for n in (1, 7, 40)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    ref = llm.generate(prompts, p, use_tqdm=False)
    runner = llm.engine.runner
    assert runner.backend.name == "reference" and not calls
    runner.backend = TritonAttention()  # what CUDA gets; the interpreter runs its kernels
    backend_only = llm.generate(prompts, p, use_tqdm=False)
    assert calls["rotary_and_store_kv"] and calls["paged_decode_attention"], calls
    assert use_triton_layers(runner.model) > 0
    layers = llm.generate(prompts, p, use_tqdm=False)

    # Batch-1 decode rows through the one-row kernel chain (what the batch-1 graph captures).
    assert supports_one_row_step(runner.model, runner.backend)
    # The 1-token prompt's prefill is a row too; the 40-token one decodes over three blocks.
    # (Each row runs a few dozen interpreted kernels: the 7-token prompt, one block like the
    # 1-token one, is left out here.)
    rows = use_one_row_chain(runner)
    one_row = [llm.generate([prompts[i]], p, use_tqdm=False)[0] for i in (0, 2)]
    assert len(rows) >= 2 * 7, rows
    for run in (backend_only, layers):
        assert_same_tokens_and_logprobs(ref, run)
    assert_same_tokens_and_logprobs([ref[0], ref[2]], one_row)
    print("fused ok")
    """
)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_fused_kernels_match_the_pytorch_path(tiny_model_dir, arch):
    assert "fused ok" in run_interpreted(_SCRIPT, str(tiny_model_dir(arch)))
