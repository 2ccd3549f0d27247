"""Every supported dtype x head size x family runs on the GPU fast path and agrees with the
reference path (PyTorch attention, no CUDA graphs, no fused kernels) on the same device.

float32 must give the reference's greedy tokens; half precision may part from them only at a
near-tie of the reference's own logprobs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS

from parallm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16
TOP_LOGPROBS = 20
# Half precision: where the fast path picks another token, the reference must have rated the
# two within this many nats (rounding of bf16 logits of this size is about 0.05).
NEAR_TIE_NATS = 0.25
PARAMS = SamplingParams(
    temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS
)


def _generate(llm: LLM, prompts: list[list[int]]):
    batch = [{"prompt_token_ids": p} for p in prompts]
    return [o.outputs[0] for o in llm.generate(batch, PARAMS, use_tqdm=False)]


def _chosen_logprobs(out) -> torch.Tensor:
    return torch.tensor([lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs, strict=True)])


def _check_half(fast, ref) -> None:
    for f, r in zip(fast, ref, strict=True):
        for step, (a, b) in enumerate(zip(f.token_ids, r.token_ids, strict=True)):
            if a == b:
                continue
            lps = r.logprobs[step]
            assert a in lps, (
                f"step {step}: fast token {a} outside the reference's top {TOP_LOGPROBS}"
            )
            gap = lps[b].logprob - lps[a].logprob
            assert gap <= NEAR_TIE_NATS, f"step {step}: parted from the reference by {gap:.3f} nats"
            break  # the continuations differ from here on


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_runs_every_dtype_and_head_dim(tiny_model_dir, prompts, arch, head_dim, dtype):
    path = str(tiny_model_dir(arch, head_dim=head_dim))
    common = dict(dtype=dtype, device="cuda", kv_cache_memory=64 << 20)
    fast = LLM(path, **common)
    assert fast.engine.runner.backend.name == "triton"
    ref = LLM(path, attention_backend="reference", enforce_eager=True, fused_kernels=False,
              **common)  # fmt: skip
    fast_out, ref_out = _generate(fast, prompts), _generate(ref, prompts)
    if dtype == "float32":
        assert [o.token_ids for o in fast_out] == [o.token_ids for o in ref_out]
        for f, r in zip(fast_out, ref_out, strict=True):
            assert torch.allclose(_chosen_logprobs(f), _chosen_logprobs(r), atol=1e-3)
    else:
        _check_half(fast_out, ref_out)
    del fast, ref
    torch.cuda.empty_cache()
