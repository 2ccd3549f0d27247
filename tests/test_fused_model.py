"""The model with ``use_fused_kernels()`` gives the PyTorch path's tokens (Triton interpreter on CPU).

The fused run uses the Triton attention backend, as on CUDA, so the fused rotary + KV-store
kernel replaces the backend's ``write_kv`` (checked by counting calls); a run with the Triton
backend and unfused model covers the backend writing its own k/v.
Runs in a subprocess because TRITON_INTERPRET must be set before triton is first imported.
"""

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
    from collections import Counter
    from parallm import LLM, SamplingParams
    from parallm.kernels import rope_store as fused_rope_store
    from parallm.layers import backends
    from parallm.layers.backends import TritonAttention

    calls = Counter()
    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    backends.write_kv = counted("write_kv", backends.write_kv)
    fused_rope_store.rotary_and_store_kv = counted("rope_store", fused_rope_store.rotary_and_store_kv)

    llm = LLM(sys.argv[1], device="cpu", max_model_len=128)
    prompts = [{"prompt_token_ids": [5 + i for i in range(n)]} for n in (1, 7, 40)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    ref = llm.generate(prompts, p, use_tqdm=False)
    runner = llm.engine.runner
    assert runner.backend.name == "reference" and not calls
    runner.backend = TritonAttention()  # what CUDA gets; the interpreter runs its kernels
    unfused = llm.generate(prompts, p, use_tqdm=False)
    assert calls["write_kv"] > 0 and not calls["rope_store"], calls
    calls.clear()
    runner.model.use_fused_kernels()
    got = llm.generate(prompts, p, use_tqdm=False)
    assert calls["rope_store"] > 0 and not calls["write_kv"], calls
    for run in (unfused, got):
        for a, b in zip(ref, run):
            x, y = a.outputs[0], b.outputs[0]
            assert x.token_ids == y.token_ids, (x.token_ids, y.token_ids)
            for t, lx, ly in zip(x.token_ids, x.logprobs, y.logprobs):
                assert abs(lx[t].logprob - ly[t].logprob) < 1e-4
    print("fused ok")
    """
)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_fused_kernels_match_the_pytorch_path(tiny_model_dir, arch):
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tiny_model_dir(arch))],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fused ok" in out.stdout
