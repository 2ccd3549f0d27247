"""Training config: TOML + overrides, errors that name the key, the learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallm.train.config import TrainConfig, parse_value
from parallm.train.optim import lr_at


def test_toml_and_overrides(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('[model]\nhidden_size = 128\n[data]\ncorpus = "synthetic"\n')
    cfg = TrainConfig.load(file, ["optim.lr=0.01", "parallel.activation_checkpointing=true"])
    assert cfg.model.hidden_size == 128
    assert cfg.data.corpus == "synthetic"
    assert cfg.optim.lr == 0.01
    assert cfg.parallel.activation_checkpointing is True


def test_parse_value() -> None:
    assert parse_value("3") == 3
    assert parse_value("1e-3") == 1e-3
    assert parse_value("false") is False
    assert parse_value('"a b"') == "a b"
    assert parse_value("runs/x") == "runs/x"  # bare words stay strings


def test_shipped_config_loads() -> None:
    cfg = TrainConfig.load(Path(__file__).parents[2] / "configs/train/code-model.toml")
    assert cfg.model_config().num_params < 12_000_000  # bf16 export stays under 24 MB
    cfg.validate(world_size=1)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.hidden_sise=3"], "model.hidden_sise"),
        (["trainig.steps=3"], "trainig.steps"),
        (["training.steps=ten"], "training.steps"),
        (["parallel.compile=1"], "parallel.compile"),
        (["parallel.tp=3"], "parallel.tp"),  # 3 divides neither 8 heads nor 4 kv heads
        (["parallel.tp=8"], "parallel.tp"),  # divides 8 heads, not 4 kv heads
        (["data.seq_len=4096"], "data.seq_len"),
        (["parallel.mixed_precision=fp8"], "parallel.mixed_precision"),
    ],
)
def test_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TrainConfig.load(None, overrides)


def test_tp_error_names_heads() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TrainConfig.load(None, ["parallel.tp=8"])


def test_unknown_section_in_file(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text("[optimizer]\nlr = 1.0\n")
    with pytest.raises(ValueError, match=r"\[optimizer\]"):
        TrainConfig.load(file)


def test_world_size_checks() -> None:
    cfg = TrainConfig.load(None, ["training.global_batch_size=12", "training.micro_batch_size=4"])
    with pytest.raises(ValueError, match="training.global_batch_size"):
        cfg.validate(world_size=2)  # 12 is not divisible by dp 2 x micro 4
    cfg = TrainConfig.load(None, ["parallel.tp=2"])
    with pytest.raises(ValueError, match="parallel.tp"):
        cfg.validate(world_size=3)
    cfg = TrainConfig.load(None, ["parallel.dp=2", "training.global_batch_size=16"])
    with pytest.raises(ValueError, match="parallel.dp"):
        cfg.validate(world_size=4)
    cfg = TrainConfig.load(None, ["training.global_batch_size=32", "training.micro_batch_size=4"])
    cfg.validate(world_size=4)
    assert (cfg.parallel.dp, cfg.grad_accum_steps) == (4, 2)


def test_lr_schedule() -> None:
    optim = TrainConfig.load(None, ["optim.lr=1.0", "optim.warmup_steps=4"]).optim
    optim.min_lr_ratio = 0.1
    lrs = [lr_at(s, optim, total_steps=14) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[15] == pytest.approx(0.1)  # past the end: stays at the floor


def test_nonfinite_policy_names_allowed_values(tmp_path: Path) -> None:
    assert TrainConfig.load(None).training.on_nonfinite_loss == "stop"
    assert (
        TrainConfig.load(None, ["training.on_nonfinite_loss=rollback"]).training.on_nonfinite_loss
        == "rollback"
    )
    file = tmp_path / "run.toml"
    file.write_text('[training]\non_nonfinite_loss = "skip"\n')
    with pytest.raises(
        ValueError, match=r"training\.on_nonfinite_loss.*\['stop', 'rollback'\].*'skip'"
    ):
        TrainConfig.load(file)
