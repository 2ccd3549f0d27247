"""Medusa heads: shapes and parameter names, Medusa's own checkpoints, checks against the target,
and the digest the export writes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from parallm.engine.spec.medusa_heads import (
    MedusaConfig,
    MedusaHeads,
    load_medusa_heads,
    save_medusa_heads,
)
from parallm.train.integrity import CheckpointError

HIDDEN, VOCAB = 16, 40
TARGET = SimpleNamespace(hidden_size=HIDDEN, vocab_size=VOCAB)


def _random_heads(num_heads: int = 3, num_layers: int = 1, seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(HIDDEN, VOCAB, num_heads, num_layers))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    return heads


def test_forward_shape_and_one_head_per_offset():
    heads = _random_heads(num_heads=3)
    hidden = torch.randn(5, HIDDEN)
    logits = heads(hidden)
    assert logits.shape == (3, 5, VOCAB)
    # Head i is its own module: its logits are its blocks then its projection.
    head1 = heads.medusa_head[1]
    block = head1[0]
    expected = head1[1](hidden + torch.nn.functional.silu(block.linear(hidden)))
    torch.testing.assert_close(logits[1], expected)


def test_parameter_names_follow_medusa():
    heads = MedusaHeads(MedusaConfig(HIDDEN, VOCAB, num_heads=2, num_layers=2))
    shapes = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    assert shapes == {
        f"medusa_head.{i}.{name}": shape
        for i in range(2)
        for name, shape in (
            ("0.linear.weight", (HIDDEN, HIDDEN)),
            ("0.linear.bias", (HIDDEN,)),
            ("1.linear.weight", (HIDDEN, HIDDEN)),
            ("1.linear.bias", (HIDDEN,)),
            ("2.weight", (VOCAB, HIDDEN)),
        )
    }


def test_new_heads_start_as_the_target_lm_head():
    heads = MedusaHeads(MedusaConfig(HIDDEN, VOCAB, num_heads=2))
    lm_head = torch.randn(VOCAB, HIDDEN)
    heads.init_projections_from(lm_head)
    hidden = torch.randn(4, HIDDEN)
    for i in range(2):
        torch.testing.assert_close(heads(hidden)[i], hidden @ lm_head.T)


@pytest.mark.parametrize("config", [
    dict(hidden_size=0, vocab_size=4), dict(hidden_size=4, vocab_size=4, num_heads=0),
    dict(hidden_size=4, vocab_size=4, num_layers=-1), dict(hidden_size=4, vocab_size=4.0),
])  # fmt: skip
def test_config_rejects_bad_sizes(config):
    with pytest.raises(ValueError, match=r"medusa\.\w+ must be an integer >="):
        MedusaConfig(**config)


def test_export_round_trip_gives_identical_logits(tmp_path):
    heads = _random_heads(num_heads=3, num_layers=1)
    save_medusa_heads(heads, tmp_path / "heads")
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == [
        "config.json", "manifest.json", "medusa_lm_head.safetensors",
    ]  # fmt: skip
    loaded = load_medusa_heads(tmp_path / "heads", TARGET, "cpu", torch.float32)
    assert loaded.config == heads.config
    hidden = torch.randn(6, HIDDEN)
    torch.testing.assert_close(loaded(hidden), heads(hidden), rtol=0, atol=0)


def test_loads_in_the_requested_dtype(tmp_path):
    save_medusa_heads(_random_heads(), tmp_path)
    loaded = load_medusa_heads(tmp_path, TARGET, "cpu", torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def _medusa_release(folder, heads: MedusaHeads, torch_file: bool) -> None:
    """A folder as FasterDecoding/Medusa publishes Medusa-1 heads: its config names only the
    head counts and base model; the weights are the head list's own state dict."""
    folder.mkdir()
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.config.num_layers,
              "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in heads.medusa_head.state_dict().items()}
    if torch_file:
        torch.save(state, folder / "medusa_lm_head.pt")
    else:
        save_file(state, str(folder / "medusa_lm_head.safetensors"))


@pytest.mark.parametrize("torch_file", [False, True])
def test_loads_medusa_released_heads(tmp_path, torch_file):
    heads = _random_heads(num_heads=4)
    _medusa_release(tmp_path / "release", heads, torch_file)
    loaded = load_medusa_heads(tmp_path / "release", TARGET, "cpu", torch.float32)
    assert loaded.config == MedusaConfig(HIDDEN, VOCAB, num_heads=4, num_layers=1)
    hidden = torch.randn(3, HIDDEN)
    torch.testing.assert_close(loaded(hidden), heads(hidden), rtol=0, atol=0)


def test_loads_prefixed_names(tmp_path):
    heads = _random_heads(num_heads=2)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))
    save_file(dict(heads.state_dict()), str(tmp_path / "medusa_lm_head.safetensors"))
    loaded = load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32)
    hidden = torch.randn(3, HIDDEN)
    torch.testing.assert_close(loaded(hidden), heads(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("field,target", [
    ("hidden_size", SimpleNamespace(hidden_size=32, vocab_size=VOCAB)),
    ("vocab_size", SimpleNamespace(hidden_size=HIDDEN, vocab_size=41)),
])  # fmt: skip
def test_size_mismatch_with_target_names_the_field(tmp_path, field, target):
    save_medusa_heads(_random_heads(), tmp_path)
    ours = getattr(TARGET, field)
    theirs = getattr(target, field)
    with pytest.raises(ValueError, match=rf"have {field}={ours}, but the target model has "
                                         rf"{field}={theirs}"):  # fmt: skip
        load_medusa_heads(tmp_path, target, "cpu", torch.float32)


def test_more_speculative_tokens_than_heads_is_refused(tmp_path):
    save_medusa_heads(_random_heads(num_heads=3), tmp_path)
    load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32, num_speculative_tokens=3)
    with pytest.raises(ValueError, match=r"num_speculative_tokens \(4\) must be <= the number "
                                         r"of Medusa heads \(3\)"):  # fmt: skip
        load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32, num_speculative_tokens=4)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    heads = _random_heads(num_heads=2)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 3}))
    save_file(dict(heads.state_dict()), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(ValueError, match=r"weights do not match config.json .*num_heads=3.*"
                                         r"missing \['medusa_head\.2\.0\.linear\.bias'"):  # fmt: skip
        load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32)


def test_corrupted_export_is_refused(tmp_path):
    save_medusa_heads(_random_heads(), tmp_path)
    weights = tmp_path / "medusa_lm_head.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one byte of a tensor: still a readable file, wrong values
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"Medusa heads .* is damaged: medusa_lm_head"
                                              r"\.safetensors does not match the xxh3_128"):  # fmt: skip
        load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32)


def test_missing_folder_and_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="Medusa heads folder .*nope does not exist"):
        load_medusa_heads(tmp_path / "nope", TARGET, "cpu", torch.float32)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="hold neither medusa_lm_head.safetensors nor"):
        load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32)


def test_heads_without_residual_blocks_round_trip(tmp_path):
    heads = _random_heads(num_heads=2, num_layers=0)
    assert sorted(heads.state_dict()) == ["medusa_head.0.0.weight", "medusa_head.1.0.weight"]
    save_medusa_heads(heads, tmp_path)
    loaded = load_medusa_heads(tmp_path, TARGET, "cpu", torch.float32)
    hidden = torch.randn(3, HIDDEN)
    torch.testing.assert_close(loaded(hidden), heads(hidden), rtol=0, atol=0)
    torch.testing.assert_close(heads(hidden)[1], hidden @ heads.medusa_head[1][0].weight.T)
