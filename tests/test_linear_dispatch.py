"""``use_skinny_gemm`` routes small-batch linears (not the LM head) to the skinny GEMM.

The kernel itself is checked in test_skinny_gemm.py (interpreter and GPU) and through the
engine in test_gpu_engine.py; here a stand-in records which calls reach it.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from parallm.config import ModelConfig
from parallm.layers.linear_dispatch import SkinnyDispatchLinear, use_skinny_gemm
from parallm.models.loader import load_model


def _model(tiny_model_dir):
    path = tiny_model_dir("llama3")
    cfg = ModelConfig.from_path(str(path))
    model = load_model(str(path), cfg, torch.float32, torch.device("cpu"), max_positions=64)
    model.fuse_projections()
    return model


def test_small_batches_go_to_the_skinny_gemm_and_outputs_stay(tiny_model_dir, monkeypatch):
    calls: list[tuple[int, ...]] = []

    def recorder(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return F.linear(x, weight, bias)

    fake = types.ModuleType("parallm.layers.skinny_gemm")
    fake.skinny_linear = recorder
    monkeypatch.setitem(sys.modules, "parallm.layers.skinny_gemm", fake)
    model = _model(tiny_model_dir)
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad():
        expected = [model.compute_logits(model(ids[:, :n])) for n in (4, 8)]
        layers = len(model.model.layers)
        assert use_skinny_gemm(model, max_rows=4) == 4 * layers  # qkv, o, gate_up, down
        assert not isinstance(model.lm_head, SkinnyDispatchLinear)
        small = model.compute_logits(model(ids[:, :4]))
        assert len(calls) == 4 * layers
        large = model.compute_logits(model(ids[:, :8]))
        assert len(calls) == 4 * layers  # 8 rows: cuBLAS
    torch.testing.assert_close(small, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(large, expected[1], rtol=0, atol=0)
    assert use_skinny_gemm(model, max_rows=0) == 0
    assert not any(isinstance(m, SkinnyDispatchLinear) for m in model.modules())
