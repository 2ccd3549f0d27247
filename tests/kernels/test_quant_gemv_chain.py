"""The batch-1 Triton chain over quantized weights (Triton interpreter on CPU): its GEMVs read
the int8 / e4m3 projections with their scales and give the tokens and logprobs of the
quantized model's own forward. Runs in a subprocess because TRITON_INTERPRET must be set
before triton is first imported."""

from __future__ import annotations

import textwrap

import pytest
from interpreted_engine import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton_interpreter  # before triton: lists its builtins once (speed)
    from interpreted_engine import assert_same_tokens_and_logprobs, use_one_row_chain
    from parallm import LLM, SamplingParams
    from parallm.engine.one_row_step import supports_one_row_step
    from parallm.kernels import gemv
    from parallm.layers.backends import TritonAttention

    scaled = []
    for name in ("gemv", "rms_norm_gemv", "silu_mul_gemv"):
        fn = getattr(gemv, name)
        def wrapper(*args, _fn=fn, **kwargs):
            scaled.append(kwargs.get("weight_scale") is not None)
            return _fn(*args, **kwargs)
        setattr(gemv, name, wrapper)

    llm = LLM(sys.argv[1], device="cpu", max_model_len=128, quantization=sys.argv[2])
    prompts = [{"prompt_token_ids": [5 + i for i in range(n)]} for n in (1, 9)]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    ref = llm.generate(prompts, p, use_tqdm=False)
    runner = llm.engine.runner
    runner.backend = TritonAttention()
    assert supports_one_row_step(runner.model, runner.backend)
    rows = use_one_row_chain(runner)
    one_row = [llm.generate([prompt], p, use_tqdm=False)[0] for prompt in prompts]
    assert len(rows) >= 2 * 5, rows
    layers = runner.model.config.num_hidden_layers
    # Per row: four scaled GEMVs a layer, then the float LM head.
    assert scaled[: 4 * layers + 1] == [True] * 4 * layers + [False], scaled[: 4 * layers + 1]
    assert_same_tokens_and_logprobs(ref, one_row)
    print("quantized chain ok")
    """
)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_the_one_row_chain_reads_quantized_weights(tiny_model_dir, method):
    args = (str(tiny_model_dir("llama3")), method)
    assert "quantized chain ok" in run_interpreted(_SCRIPT, *args)
