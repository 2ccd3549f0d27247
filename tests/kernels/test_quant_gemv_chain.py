"""The batch-1 Triton chain over quantized weights (Triton interpreter on CPU): its GEMVs read
the int8 / e4m3 projections with their scales and give the tokens and logprobs of the
quantized model's own forward. Runs in a subprocess because TRITON_INTERPRET must be set
before triton is first imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from parallm import LLM, SamplingParams
    from parallm.engine.one_row_step import OneRowStep, supports_one_row_step
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
    step, plain = OneRowStep(runner.model, runner.backend), runner.forward_logits
    rows = []
    def forward_logits(inputs, device_ids=None):
        if len(inputs.input_ids) != 1:
            return plain(inputs, device_ids)
        rows.append(1)
        ids, positions = (torch.from_numpy(a) for a in (inputs.input_ids, inputs.positions))
        return step.logits(ids, positions, runner._build_metadata(inputs), runner.kv_caches)
    runner.forward_logits = forward_logits
    one_row = [llm.generate([prompt], p, use_tqdm=False)[0] for prompt in prompts]
    assert len(rows) >= 2 * 5, rows
    layers = runner.model.config.num_hidden_layers
    # Per row: four scaled GEMVs a layer, then the float LM head.
    assert scaled[: 4 * layers + 1] == [True] * 4 * layers + [False], scaled[: 4 * layers + 1]
    for a, b in zip(ref, one_row):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids, (x.token_ids, y.token_ids)
        for t, lx, ly in zip(x.token_ids, x.logprobs, y.logprobs):
            assert abs(lx[t].logprob - ly[t].logprob) < 1e-4
    print("quantized chain ok")
    """
)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_the_one_row_chain_reads_quantized_weights(tiny_model_dir, method):
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    args = [sys.executable, "-c", _SCRIPT, str(tiny_model_dir("llama3")), method]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quantized chain ok" in out.stdout
