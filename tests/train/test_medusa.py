"""Medusa heads trained by ``parallm train`` on a frozen tiny target, exported, and loaded.

One process (gloo, world size 1), float32 on CPU. The corpus repeats one sentence, so the token
two ahead is predictable from the target's hidden state and a head that learns beats chance by
far.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from parallm.config import ModelConfig
from parallm.engine.spec.medusa_heads import MedusaHeads, load_medusa_heads
from parallm.models.loader import load_model
from parallm.train.checkpoint import complete_checkpoints
from parallm.train.config import TrainConfig
from parallm.train.export import export_checkpoint, load_checkpoint_model
from parallm.train.integrity import CheckpointError
from parallm.train.medusa import MedusaTrainer, head_losses
from parallm.train.medusa_export import load_checkpoint_heads
from parallm.train.trainer import Trainer

try:  # tests/ is on sys.path under pytest's default import mode
    from tiny_models import make_tiny_model
except ImportError:
    from tests.tiny_models import make_tiny_model

SENTENCE = "the quick brown fox jumps over a lazy dog; "
VOCAB = 480  # the tiny byte-level tokenizer's size (tests/tokenizer_factory.py)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama3", tmp_path_factory.mktemp("medusa") / "target")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("medusa-corpus")
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(SENTENCE * 40)
    return folder


def medusa_raw(tmp_path: Path, target: Path, corpus: Path, **overrides: Any) -> dict[str, Any]:
    """The config's sections; ``overrides`` are ``section__key=value``."""
    raw: dict[str, dict[str, Any]] = {
        "data": {
            "corpus": str(corpus), "extensions": [".txt"], "dataset_dir": str(tmp_path / "data"),
            "vocab_size": VOCAB, "seq_len": 32, "val_fraction": 0.0,
        },
        "training": {
            "objective": "medusa", "steps": 30, "global_batch_size": 8, "micro_batch_size": 4,
            "eval_samples": 8, "device": "cpu",
        },
        "optim": {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.0},
        "medusa": {"target": str(target), "num_heads": 3, "num_layers": 1},
        "checkpoint": {"every": 10, "async_save": False},
        "logging": {"dir": str(tmp_path / "run"), "progress_bar": False},
    }  # fmt: skip
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


def medusa_config(tmp_path: Path, target: Path, corpus: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig.from_dict(medusa_raw(tmp_path, target, corpus, **overrides))


def run(cfg: TrainConfig, steps: int | None = None) -> list[dict[str, Any]]:
    with MedusaTrainer(cfg) as trainer:
        return trainer.train(steps)


def test_head_losses_score_head_i_against_the_token_i_plus_2_ahead():
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (2, 6))  # [B, S + 1], S = 5
    logits = torch.randn(3, 2, 5, 7)
    sums, correct, counts = head_losses(logits, tokens)
    for i in range(3):
        scored, labels = logits[i, :, : 4 - i], tokens[:, i + 2 :]
        expected = F.cross_entropy(scored.reshape(-1, 7), labels.reshape(-1), reduction="sum")
        torch.testing.assert_close(sums[i], expected)
        assert counts[i] == 2 * (4 - i)
        assert correct[i] == (scored.argmax(-1) == labels).sum()
    # A zero-weight row (evaluation padding) counts for nothing.
    sums_w, _, counts_w = head_losses(logits, tokens, torch.tensor([1.0, 0.0]))
    sums_1, _, counts_1 = head_losses(logits[:, :1], tokens[:1])
    torch.testing.assert_close(sums_w, sums_1)
    torch.testing.assert_close(counts_w, counts_1)


def test_training_lowers_head_loss_and_beats_chance(tmp_path, target, corpus):
    history = run(medusa_config(tmp_path, target, corpus))
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert len(last["head_accuracy"]) == 3
    for i in range(3):
        assert last["head_loss"][i] < first["head_loss"][i]
    # Chance is 1 / 480; the sentence makes every head's token predictable.
    assert first["head_accuracy"][0] < 0.5
    assert last["head_accuracy"][0] > 0.8
    assert last["val_head_accuracy"][0] > 0.8
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_head_accuracy" in r for r in records)
    assert all(len(r["head_accuracy"]) == 3 for r in records if "loss" in r)


def test_target_stays_frozen_and_only_heads_are_checkpointed(tmp_path, target, corpus):
    cfg = medusa_config(tmp_path, target, corpus, training__steps=10)
    with MedusaTrainer(cfg) as trainer:
        before = {k: v.clone() for k, v in trainer.target.state_dict().items()}
        trainer.train()
        assert all(not p.requires_grad for p in trainer.target.parameters())
        for name, value in trainer.target.state_dict().items():
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    (checkpoint,) = complete_checkpoints(tmp_path / "run" / "checkpoints")
    heads, config = load_checkpoint_heads(checkpoint)
    assert config["medusa_num_heads"] == 3
    assert config["base_model_name_or_path"] == str(target)
    assert set(heads.state_dict()) == set(MedusaHeads(heads.config).state_dict())


def test_resume_continues_exactly(tmp_path, target, corpus):
    straight = run(medusa_config(tmp_path / "a", target, corpus, training__steps=20))
    resumed_dir = tmp_path / "b"
    run(medusa_config(resumed_dir, target, corpus, training__steps=20), steps=10)
    with MedusaTrainer(medusa_config(resumed_dir, target, corpus, training__steps=20)) as trainer:
        assert trainer.step == 10
        rest = trainer.train()
    assert [m["loss"] for m in rest] == pytest.approx([m["loss"] for m in straight[10:]])


def test_export_round_trip_gives_the_trained_heads_logits(tmp_path, target, corpus):
    run(medusa_config(tmp_path, target, corpus, training__steps=10))
    out = tmp_path / "heads"
    export_checkpoint(tmp_path / "run" / "checkpoints", out, dtype="float32")
    target_cfg = ModelConfig.from_dict(json.loads((target / "config.json").read_text()))
    loaded = load_medusa_heads(out, target_cfg, "cpu", torch.float32, num_speculative_tokens=3)
    (checkpoint,) = complete_checkpoints(tmp_path / "run" / "checkpoints")
    trained, _ = load_checkpoint_heads(checkpoint)
    model = load_model(target, target_cfg, torch.float32, torch.device("cpu"), 64)
    tokens = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        hidden = model(tokens)[0]  # [S, H]: final hidden states, after the final norm
        torch.testing.assert_close(loaded(hidden), trained(hidden), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == str(target)


def test_corrupted_export_is_refused(tmp_path, target, corpus):
    run(medusa_config(tmp_path, target, corpus, training__steps=10))
    out = tmp_path / "heads"
    export_checkpoint(tmp_path / "run" / "checkpoints", out, dtype="bfloat16")
    target_cfg = ModelConfig.from_dict(json.loads((target / "config.json").read_text()))
    config = out / "config.json"
    config.write_text(config.read_text().replace('"medusa_num_heads": 3', '"medusa_num_heads": 2'))
    with pytest.raises(CheckpointError, match=r"config\.json does not match the xxh3_128"):
        load_medusa_heads(out, target_cfg, "cpu", torch.float32)


@pytest.mark.parametrize("overrides,message", [
    ({"medusa__target": ""}, "medusa.target is required"),
    ({"medusa__target": "/nonexistent/x"}, "medusa.target: no such directory"),
    ({"medusa__num_heads": 0}, "medusa.num_heads must be >= 1, got 0"),
    ({"medusa__loss_decay": 0.0}, r"medusa.loss_decay must be in \(0, 1\]"),
    ({"parallel__tp": 2}, 'parallel.tp must be 1 with training.objective = "medusa"'),
    ({"data__seq_len": 4}, r"data.seq_len \(4\) must be >= medusa.num_heads \+ 2 \(5\)"),
    ({"training__objective": "eagle"}, r"training.objective must be one of \['lm', 'medusa'\]"),
])  # fmt: skip
def test_bad_config_names_the_key(tmp_path, target, corpus, overrides, message):
    with pytest.raises(ValueError, match=message):
        medusa_config(tmp_path, target, corpus, **overrides)


def test_target_that_does_not_fit_the_data_is_refused(tmp_path, target, corpus):
    cfg = medusa_config(tmp_path, target, corpus, data__vocab_size=512)
    with pytest.raises(ValueError, match=r"data.vocab_size \(512\) must equal the vocab_size of "
                                         r"medusa.target \(480\)"):  # fmt: skip
        MedusaTrainer(cfg)
    with pytest.raises(ValueError, match="is neither a model directory .* nor a training"):
        MedusaTrainer(medusa_config(tmp_path, target, corpus, medusa__target=str(corpus)))


def test_target_from_a_training_checkpoint(tmp_path):
    lm = {
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1,
                  "max_position_embeddings": 64},
        "data": {"corpus": "synthetic", "vocab_size": 64, "seq_len": 16},
        "training": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 2,
                     "eval_samples": 2, "device": "cpu"},
        "checkpoint": {"async_save": False},
        "logging": {"dir": str(tmp_path / "lm"), "progress_bar": False},
    }  # fmt: skip
    with Trainer(TrainConfig.from_dict(lm)) as trainer:
        trainer.train()
    checkpoints = tmp_path / "lm" / "checkpoints"
    cfg = medusa_config(
        tmp_path, checkpoints, tmp_path, data__corpus="synthetic", data__vocab_size=64,
        data__seq_len=16, training__steps=2,
    )  # fmt: skip
    with MedusaTrainer(cfg) as trainer:
        history = trainer.train()
        expected, _ = load_checkpoint_model(complete_checkpoints(checkpoints)[-1])
        for name, value in expected.state_dict().items():
            torch.testing.assert_close(trainer.target.state_dict()[name], value, rtol=0, atol=0)
    assert len(history) == 2 and all(len(m["head_accuracy"]) == 3 for m in history)


@pytest.mark.gpu
def test_training_on_cuda_in_bfloat16_beats_chance(tmp_path, target, corpus):
    # mixed_precision "auto": the target runs in bfloat16 and FSDP computes the heads in it,
    # with float32 masters and gradient reduction.
    history = run(medusa_config(tmp_path, target, corpus, training__device="cuda"))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["val_head_accuracy"][0] > 0.8


def test_heads_or_damaged_checkpoint_as_target_is_named(tmp_path, target, corpus):
    run(medusa_config(tmp_path / "heads-run", target, corpus, training__steps=2))
    (step,) = complete_checkpoints(tmp_path / "heads-run" / "run" / "checkpoints")
    with pytest.raises(ValueError, match=r"medusa.target: .*step-00000002 holds Medusa heads"):
        MedusaTrainer(medusa_config(tmp_path, step, corpus))
    (step / "train_state.json").write_text("{}")  # no longer what the manifest recorded
    with pytest.raises(ValueError, match=r"medusa.target: checkpoint .*step-00000002 is damaged"):
        MedusaTrainer(medusa_config(tmp_path, step, corpus))


def test_sequence_length_is_bounded_by_the_targets_positions(tmp_path, target, corpus):
    # [model] is unused by a Medusa run: its default positions (1024) bound nothing.
    cfg = medusa_config(tmp_path, target, corpus, data__seq_len=2048)
    with pytest.raises(ValueError, match=r"data.seq_len \(2048\) must be <= the "
                                         r"max_position_embeddings of medusa.target \(512\)"):  # fmt: skip
        MedusaTrainer(cfg)
