"""benchmarks/spec_oracle_bench.py on CPU with a tiny dummy model: the oracle drafter's drafts
are accepted (all of them when none is made wrong), and the output stays plain decoding's; its
peaked dummy weights keep the greedy argmax the same under two roundings (float32, bfloat16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_module import load_benchmark

from parallm.config import ModelConfig
from parallm.models.loader import load_model

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks/spec_oracle_bench.py"


def test_oracle_bench_reports_tokens_per_step(tiny_model_dir, tmp_path):
    out = tmp_path / "oracle.json"
    cmd = [sys.executable, str(REPO / "benchmarks/spec_oracle_bench.py"),
           "--config", str(tiny_model_dir("llama3") / "config.json"), "--device", "cpu", "--dtype", "float32",
           "--batch-sizes", "2", "--k", "2,4", "--wrong", "0,0.6", "--input-len", "8",
           "--output-len", "20", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["k"], r["wrong"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(2, 0.0), (2, 0.6), (4, 0.0), (4, 0.6)}
    assert all(r["identical_outputs"] == 1.0 for r in rows.values())  # float32: plain decoding's
    for k in (2, 4):
        right, wrong = rows[(k, 0.0)]["tokens_per_step"], rows[(k, 0.6)]["tokens_per_step"]
        assert k / 2 < right <= k + 1  # every draft right: close to k + 1 a step
        assert 1 <= wrong < right
    assert rows[(4, 0.0)]["tokens_per_step"] > rows[(2, 0.0)]["tokens_per_step"]


def test_device_mode_prompts_make_prompt_lookup_the_oracle(tiny_model_dir, tmp_path):
    """On CPU the engine drafts on the host (no async scheduling), with the same prompt lookup
    over the same counting-run prompts: every draft right without wrong run tokens, fewer with
    them, and the output plain decoding's either way."""
    out = tmp_path / "oracle.json"
    cmd = [sys.executable, str(BENCH), "--config", str(tiny_model_dir("llama3") / "config.json"),
           "--device", "cpu", "--dtype", "float32", "--drafter", "device", "--batch-sizes", "2",
           "--k", "3", "--wrong", "0,0.5", "--input-len", "8", "--output-len", "24",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["wrong"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {0.0, 0.5}
    assert all(r["identical_outputs"] == 1.0 for r in rows.values())
    assert rows[0.0]["tokens_per_step"] == pytest.approx(4.0, abs=0.3)  # k + 1 a drafted step
    assert rows[0.5]["tokens_per_engine_step"] < rows[0.0]["tokens_per_engine_step"]
    # Efficiency divides by one sequence's tokens a step, at most k + 1, not the batch's.
    for r in rows.values():
        assert 1 <= r["speedup"] / r["efficiency"] <= 3 + 1 + 1e-9


def test_run_prompts_differ_only_where_run_tokens_are_made_wrong():
    bench = _bench()
    right = bench._run_prompts(3, 5, 20, 1000, seed=1, wrong=0.0)
    wrong = bench._run_prompts(3, 5, 20, 1000, seed=1, wrong=0.5)
    for r, w in zip(right, wrong, strict=True):
        assert len(r) == len(w) == 5 + 20 + 8 + 1
        assert r[5:25] == [(r[5] + i) % 1000 for i in range(20)]  # the counting run
        assert r[-1] == (r[5] - 1) % 1000  # its continuation under peaked weights is the run
        changed = [i for i in range(len(r)) if r[i] != w[i]]
        assert changed and all(5 <= i < 25 for i in changed)


def _bench():
    return load_benchmark("spec_oracle_bench")


def _config(**small) -> ModelConfig:
    """The 1B shape's config.json made small."""
    d = json.loads((REPO / "benchmarks/configs/llama-3.2-1b.json").read_text())
    return ModelConfig.from_dict({**d, **small})


def _dummy_logits(tied: bool, peaked: bool) -> dict[torch.dtype, torch.Tensor]:
    """Float32 logits of one dummy model computed in float32 and in bfloat16 (two roundings
    of the same weights, as the verify and decode kernels are), over random tokens."""
    cfg = _config(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096,
                  tie_word_embeddings=tied)  # fmt: skip
    ids = torch.randint(10, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(None, cfg, dtype, torch.device("cpu"), 64, load_format="dummy")
        if peaked:
            _bench().peak_dummy_logits(model)
        with torch.no_grad():
            out[dtype] = model.compute_logits(model(ids)).float()
    return out, ids


@pytest.mark.parametrize("tied", [False, True])
def test_peaked_dummy_weights_make_argmaxes_robust_to_rounding(tied):
    raw, _ = _dummy_logits(tied, peaked=False)
    disagree = (raw[torch.float32].argmax(-1) != raw[torch.bfloat16].argmax(-1)).float().mean()
    assert disagree > 0.1  # near ties: two roundings of plain dummy weights disagree often
    peaked, ids = _dummy_logits(tied, peaked=True)
    greedy = peaked[torch.float32].argmax(-1)
    assert torch.equal(greedy, peaked[torch.bfloat16].argmax(-1))
    assert torch.equal(greedy, (ids + 1) % 4096)  # the next token is t + 1
    top2 = peaked[torch.bfloat16].topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) > 0.5 * top2[..., 0]).all()


def test_a_tied_head_gets_its_own_weights():
    cfg = _config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=256)  # fmt: skip
    assert cfg.tie_word_embeddings
    model = load_model(None, cfg, torch.float32, torch.device("cpu"), 16, load_format="dummy")
    embed = model.model.embed_tokens.weight.detach().clone()
    _bench().peak_dummy_logits(model, scale=10.0)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, embed.roll(1, dims=0))
    assert torch.equal(model.model.embed_tokens.weight, embed * 10.0)
