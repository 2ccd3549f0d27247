"""Loading checkpoints: architectures, missing and misshapen tensors, dtypes, dummy weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parallm import LLM, SamplingParams
from parallm.config import ModelConfig


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_lists_the_supported_ones(tiny_model_dir, tmp_path):
    path = _copy(tiny_model_dir("llama3"), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(path), device="cpu")


@pytest.mark.parametrize("change", ["drop", "reshape", "extra"])
def test_bad_tensors_are_named(tiny_model_dir, tmp_path, change):
    path = _copy(tiny_model_dir("qwen2"), tmp_path)
    file = path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.self_attn.k_proj.bias"
    if change == "drop":
        del tensors[name]
    elif change == "reshape":
        tensors[name] = torch.zeros(3)
    else:
        name = "model.layers.0.mlp.extra.weight"
        tensors[name] = torch.zeros(2)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LLM(str(path), device="cpu")


def test_dummy_weights_from_a_config_file(tiny_model_dir):
    config = tiny_model_dir("qwen3") / "config.json"
    llm = LLM(str(config), load_format="dummy", device="cpu")
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    ids = out[0].outputs[0].token_ids
    assert len(ids) == 3
    # Without tokenizer files, token i reads as "<i>", so streamed text is never empty.
    assert out[0].outputs[0].text == "".join(f"<{i}>" for i in ids)
    assert llm.get_tokenizer()("<5><6> <7>")["input_ids"] == [5, 6, 7]
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM(str(config), device="cpu")


def test_bfloat16_load_keeps_rope_tables_in_float32(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama3")), dtype="bfloat16", device="cpu")
    model = llm.engine.runner.model
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_config_reads_both_rope_forms(tiny_model_dir):
    new = ModelConfig.from_path(tiny_model_dir("llama3"))
    old = ModelConfig.from_path(tiny_model_dir("llama3", legacy_rope_keys=True))
    assert new.rope_theta == old.rope_theta == 500000.0
    assert new.rope_scaling["rope_type"] == old.rope_scaling["rope_type"] == "llama3"
    assert ModelConfig.from_path(tiny_model_dir("qwen3")).head_dim == 32
