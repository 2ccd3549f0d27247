"""The L2 prefetch hooks: where they attach, when they act, and that they change no output.

The prefetch itself needs CUDA (``tests/test_gpu_engine.py`` checks the engine's tokens with it
on against the reference path); on CPU the hooks must stay inert.
"""

from __future__ import annotations

import pytest
import torch

from parallm.config import ModelConfig
from parallm.engine.l2_prefetch import L2Prefetcher
from parallm.models.llama import LlamaForCausalLM


def _tiny_model(fused: bool = True) -> LlamaForCausalLM:
    cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64,
    })  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, max_positions=64)
    if fused:
        model.fuse_projections()
    return model


def test_hooks_every_layer_and_removes_cleanly():
    model = _tiny_model()
    prefetcher = L2Prefetcher(megabytes=4, max_rows=8)
    assert prefetcher.install(model) == 3
    assert len(prefetcher.handles) == 4  # one per layer, plus the join after the last layer
    prefetcher.remove()
    assert prefetcher.handles == []
    assert all(not m._forward_hooks for m in model.modules())


def test_needs_fused_projections():
    with pytest.raises(ValueError, match="fuse_projections"):
        L2Prefetcher(megabytes=4, max_rows=8).install(_tiny_model(fused=False))


def test_inert_on_cpu():
    model = _tiny_model()
    ids = torch.randint(0, 64, (1, 10))
    before = model(ids, torch.arange(10)[None], None)
    prefetcher = L2Prefetcher(megabytes=4, max_rows=64)
    prefetcher.install(model)
    after = model(ids, torch.arange(10)[None], None)
    assert torch.equal(before, after)
    assert prefetcher.stream is None  # nothing was launched


def test_engine_rejects_bad_budget(tiny_model_dir):
    from parallm import LLM

    path = str(tiny_model_dir("llama3"))
    with pytest.raises(ValueError, match=r"l2_prefetch_mb must be a number in \[0, 1024\]"):
        LLM(path, device="cpu", l2_prefetch_mb=-1)
    with pytest.raises(ValueError, match="l2_prefetch_mb > 0 needs device='cuda'"):
        LLM(path, device="cpu", l2_prefetch_mb=8)
