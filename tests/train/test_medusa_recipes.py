"""The shipped Medusa recipes: both parse, and the CPU-sized one trains, checkpoints and exports
heads that load onto the bundled model, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bundled_quality import needs_bundled

from parallm.bundled import BUNDLED_MODEL_DIR
from parallm.cli import main
from parallm.config import ModelConfig
from parallm.engine.spec.medusa_heads import load_medusa_heads
from parallm.train.config import TrainConfig

CONFIGS = Path(__file__).parents[2] / "configs" / "train"

pytestmark = needs_bundled


@pytest.mark.parametrize("name", ["medusa-code.toml", "medusa-tiny.toml"])
def test_recipe_parses_as_medusa_on_the_bundled_model(name):
    cfg = TrainConfig.load(CONFIGS / name)
    assert cfg.training.objective == "medusa"
    assert Path(cfg.medusa.target).resolve() == BUNDLED_MODEL_DIR.resolve()


def test_150m_recipe_reuses_its_targets_dataset():
    # Its target is trained on the GPU, so it stands in the bundled model's place here.
    cfg = TrainConfig.load(
        CONFIGS / "medusa-code-150m.toml", [f'medusa.target="{BUNDLED_MODEL_DIR}"']
    )
    target = TrainConfig.load(CONFIGS / "code-model-150m.toml")
    assert cfg.training.objective == "medusa"
    assert cfg.data == target.data


def test_tiny_recipe_trains_and_exports_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[2])  # the recipe names the target relative to it
    args = ["train", "--config", str(CONFIGS / "medusa-tiny.toml"),
            "--set", f'data.dataset_dir="{tmp_path / "data"}"',
            "--set", f'logging.dir="{tmp_path / "run"}"',
            "--set", "training.steps=4", "--set", "training.eval_every=0",
            "--set", "logging.progress_bar=false"]  # fmt: skip
    assert main(args) == 0
    assert "Medusa heads' validation top-1 accuracy: " in capsys.readouterr().err
    out = tmp_path / "heads"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints"),
                 "--out", str(out)]) == 0  # fmt: skip
    target = ModelConfig.from_dict(json.loads((BUNDLED_MODEL_DIR / "config.json").read_text()))
    heads = load_medusa_heads(out, target, "cpu", torch.float32, num_speculative_tokens=2)
    assert heads(torch.zeros(3, target.hidden_size)).shape == (2, 3, target.vocab_size)
