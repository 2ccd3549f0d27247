"""Checkpoint integrity: manifests of file digests, damaged checkpoints skipped on resume, and
non-finite losses or states that stop the run (or roll it back) and are never saved.

Every test starts from a copy of one tiny run's checkpoints (steps 2 and 4) and damages it the
way disks and people do: bytes overwritten in place, files truncated, the manifest lost.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import dataset_dir, tiny_cfg, train_losses, write_config  # noqa: F401 - fixture

from parallm.train.checkpoint import complete_checkpoints
from parallm.train.config import TrainConfig
from parallm.train.integrity import MANIFEST, TRAIN_STATE, CheckpointError, verify_checkpoint
from parallm.train.trainer import Trainer, TrainingHalted

BASE = ("training.steps=4", "checkpoint.every=2", "checkpoint.keep=5")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Path:  # noqa: F811
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4; returns its run folder."""
    tmp_path = tmp_path_factory.mktemp("source")
    with Trainer(tiny_cfg(tmp_path, dataset_dir, *BASE)) as trainer:
        trainer.train()
    return tmp_path / "run"


def copied_run(tmp_path: Path, dataset: Path, source: Path, *overrides: str) -> TrainConfig:
    """A config whose checkpoint folder is a fresh copy of the source run's."""
    cfg = tiny_cfg(tmp_path, dataset, *BASE, *overrides)
    shutil.copytree(source / "checkpoints", cfg.checkpoint_dir)
    return cfg


@pytest.fixture
def run_copy(tmp_path: Path, dataset_dir: Path, source_run: Path) -> TrainConfig:  # noqa: F811
    """``copied_run`` with the base settings: checkpoints at steps 2 and 4."""
    return copied_run(tmp_path, dataset_dir, source_run)


def checkpoint(cfg: TrainConfig, step: int) -> Path:
    return cfg.checkpoint_dir / f"step-{step:08d}"


def largest_shard(checkpoint: Path) -> Path:
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


def overwrite_middle(path: Path, data: bytes) -> None:
    """Overwrite ``len(data)`` bytes in the middle of ``path``, keeping its size."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2 - len(data) // 2)
        f.write(data)
    assert path.stat().st_size == size


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def drop_manifest(checkpoint: Path) -> None:
    """Make ``checkpoint`` look written before manifests existed."""
    (checkpoint / MANIFEST).unlink()
    state = json.loads((checkpoint / TRAIN_STATE).read_text())
    del state["manifest"]
    (checkpoint / TRAIN_STATE).write_text(json.dumps(state))


def checkpoint_is_finite(checkpoint: Path) -> bool:
    from parallm.train.export import load_checkpoint_model

    model, _ = load_checkpoint_model(checkpoint)
    return all(torch.isfinite(p).all() for p in model.parameters())


def warnings_naming(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and str(path) in r.getMessage()
    ]


def test_manifest_digests_every_file(source_run: Path) -> None:
    for checkpoint in complete_checkpoints(source_run / "checkpoints"):
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        files = {
            p.relative_to(checkpoint).as_posix(): p for p in checkpoint.rglob("*") if p.is_file()
        }
        assert set(manifest["files"]) == set(files) - {MANIFEST}
        assert {".metadata", TRAIN_STATE, "config.json", "tokenizer/tokenizer.json"} <= set(files)
        for name, entry in manifest["files"].items():
            assert entry["bytes"] == files[name].stat().st_size
        assert json.loads((checkpoint / TRAIN_STATE).read_text())["manifest"] == MANIFEST
        assert verify_checkpoint(checkpoint) is True


DAMAGES = {
    # A 4 KiB overwrite in the middle of the largest shard, size unchanged: only a digest sees it.
    "overwritten-shard": (
        lambda c: overwrite_middle(largest_shard(c), random.Random(0).randbytes(4096)),
        "does not match",
    ),
    "truncated-shard": (lambda c: truncate(largest_shard(c)), "bytes where"),
    "truncated-metadata": (lambda c: truncate(c / ".metadata"), ".metadata has"),
    "lost-manifest": (lambda c: (c / MANIFEST).unlink(), "manifest.json is missing"),
    "deleted-metadata": (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_resumes_from_previous(
    tmp_path: Path,
    source_run: Path,
    run_copy: TrainConfig,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg, newest = run_copy, checkpoint(run_copy, 4)
    apply, expected = DAMAGES[damage]
    apply(newest)
    with pytest.raises(CheckpointError, match=expected):
        verify_checkpoint(newest)
    caplog.set_level(logging.WARNING)
    with Trainer(cfg) as trainer:
        assert trainer.resumed_from == checkpoint(cfg, 2)
        assert trainer.step == 2
        (warning,) = warnings_naming(caplog, newest)
        assert expected in warning and "\n" not in warning
        trainer.train()
    # Steps 3 and 4 from the intact step-2 checkpoint are those of the uninterrupted run, and
    # step 4 is written again, intact.
    reference = train_losses(source_run)
    got = train_losses(tmp_path / "run")
    assert [got[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], abs=1e-6)
    assert verify_checkpoint(newest) is True


def test_checkpoint_without_manifest_loads_unverified(
    run_copy: TrainConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints written before manifests existed still load, with a warning."""
    cfg, newest = run_copy, checkpoint(run_copy, 4)
    drop_manifest(newest)
    assert verify_checkpoint(newest) is False
    caplog.set_level(logging.WARNING)
    with Trainer(cfg) as trainer:
        assert trainer.resumed_from == newest
        (warning,) = warnings_naming(caplog, newest)
        assert "cannot be verified" in warning


def test_unverifiable_checkpoint_with_nan_bytes_is_skipped(
    run_copy: TrainConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's run: an old checkpoint overwritten with 0xFF (NaN as float32) loaded silently
    and trained on NaN. Without a manifest, loading still checks every value is finite."""
    cfg, newest = run_copy, checkpoint(run_copy, 4)
    drop_manifest(newest)
    overwrite_middle(largest_shard(newest), b"\xff" * 4096)
    caplog.set_level(logging.WARNING)
    with Trainer(cfg) as trainer:
        assert trainer.resumed_from == checkpoint(cfg, 2)
        assert any("skipping it" in w for w in warnings_naming(caplog, newest))


def test_every_checkpoint_damaged_exits_nonzero_naming_them(
    tmp_path: Path, run_copy: TrainConfig, capsys: pytest.CaptureFixture
) -> None:
    from parallm.cli import main

    overwrite_middle(largest_shard(checkpoint(run_copy, 4)), b"\0" * 4096)
    truncate(checkpoint(run_copy, 2) / ".metadata")
    capsys.readouterr()
    args = ["train", "--config", str(tmp_path / "run.toml"), *(f"--set={o}" for o in BASE)]
    assert main(args) != 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "parallm train: error" in x]  # one paragraph
    assert "no intact checkpoint" in line
    assert str(checkpoint(run_copy, 4)) in line and "does not match" in line
    assert str(checkpoint(run_copy, 2)) in line and ".metadata has" in line
    assert "Traceback" not in err


def _nan_loss_when(condition: Any) -> Any:
    """A ``Trainer._loss`` that is NaN while ``condition(trainer)`` holds."""
    original = Trainer._loss

    def loss(self: Trainer, tokens: torch.Tensor) -> torch.Tensor:
        value = original(self, tokens)
        return value * math.nan if condition(self) else value

    return loss


def test_nan_loss_stops_nonzero_and_saves_nothing_after(
    tmp_path: Path,
    dataset_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from parallm.cli import main

    # Step 3 (computed while trainer.step == 2) goes NaN; checkpoints every step.
    monkeypatch.setattr(Trainer, "_loss", _nan_loss_when(lambda t: t.step == 2))
    file = write_config(
        tmp_path / "run.toml",
        dataset_dir,
        tmp_path / "run",
        training__steps=6,
        checkpoint__every=1,
        checkpoint__keep=10,
    )
    capsys.readouterr()
    assert main(["train", "--config", str(file)]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan)" in err and "step 3" in err and "Traceback" not in err
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]
    for checkpoint in complete_checkpoints(ckpts):
        assert verify_checkpoint(checkpoint) and checkpoint_is_finite(checkpoint)
    assert max(train_losses(tmp_path / "run")) == 2  # the NaN step is not logged either


def test_nonfinite_parameters_are_never_saved(tmp_path: Path, dataset_dir: Path) -> None:  # noqa: F811
    """Step 3's loss is finite (computed before its update), but the update leaves a NaN weight:
    the step-3 save is refused and the run stops."""
    cfg = tiny_cfg(tmp_path, dataset_dir, "training.steps=6", "checkpoint.every=1")
    with Trainer(cfg) as trainer:
        step = trainer.optimizer.step

        def poisoning_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            if trainer.step == 2:  # incremented after the optimizer step
                with torch.no_grad():
                    next(trainer.model.parameters()).to_local()[0, 0] = math.nan
            return out

        trainer.optimizer.step = poisoning_step
        with pytest.raises(TrainingHalted, match="at step 3 holds NaN or infinite values"):
            trainer.train()
    names = sorted(p.name for p in cfg.checkpoint_dir.iterdir())
    assert names == ["step-00000001", "step-00000002"]


def test_rollback_reloads_and_skips_the_bad_batch(
    tmp_path: Path,
    dataset_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The batch of step 3 (samples 16..23) is NaN whenever it is trained on.
    monkeypatch.setattr(Trainer, "_loss", _nan_loss_when(lambda t: t.batch_start == 16))
    cfg = tiny_cfg(
        tmp_path,
        dataset_dir,
        "training.steps=5",
        "checkpoint.every=2",
        "training.on_nonfinite_loss=rollback",
    )
    with Trainer(cfg) as trainer:
        history = trainer.train()
    steps = [m["step"] for m in history]
    assert steps == [1, 2, 3, 3, 4, 5]  # step 3 went NaN, rolled back to step 2, went on
    assert math.isnan(history[2]["loss"]) and all(math.isfinite(m["loss"]) for m in history[3:])
    state = json.loads((checkpoint(cfg, 5) / TRAIN_STATE).read_text())
    assert state["skipped_batches"] == [16]
    assert state["dataloader"]["samples_seen"] == 6 * 8  # five batches trained, one skipped
    assert checkpoint_is_finite(checkpoint(cfg, 5))


def test_rollback_gives_up_when_every_batch_goes_nonfinite(
    tmp_path: Path,
    dataset_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Trainer, "_loss", _nan_loss_when(lambda t: t.step >= 2))
    cfg = tiny_cfg(
        tmp_path,
        dataset_dir,
        "training.steps=8",
        "checkpoint.every=2",
        "training.on_nonfinite_loss=rollback",
    )
    with Trainer(cfg) as trainer, pytest.raises(TrainingHalted, match="3 rollbacks"):
        trainer.train()
    assert [p.name for p in complete_checkpoints(cfg.checkpoint_dir)] == ["step-00000002"]


def test_rollback_without_a_checkpoint_stops(
    tmp_path: Path,
    dataset_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Trainer, "_loss", _nan_loss_when(lambda t: t.step == 0))
    cfg = tiny_cfg(tmp_path, dataset_dir, "training.steps=3", "training.on_nonfinite_loss=rollback")
    with (
        Trainer(cfg) as trainer,
        pytest.raises(TrainingHalted, match="no checkpoint to roll back to"),
    ):
        trainer.train()


def test_keep_never_deletes_the_newest_intact_checkpoint(
    tmp_path: Path,
    dataset_dir: Path,  # noqa: F811
    source_run: Path,
) -> None:
    """Resumed from step 2 because step 4 is damaged, the run saves step 3; with keep = 1 that
    new checkpoint, not the higher-numbered damaged one, is the one kept."""
    cfg = copied_run(
        tmp_path,
        dataset_dir,
        source_run,
        "training.steps=3",
        "checkpoint.every=1",
        "checkpoint.keep=1",
    )
    truncate(largest_shard(checkpoint(cfg, 4)))
    with Trainer(cfg) as trainer:
        assert trainer.step == 2
        trainer.train()
    kept = complete_checkpoints(cfg.checkpoint_dir)
    assert [p.name for p in kept] == ["step-00000003"]
    assert verify_checkpoint(kept[0]) and checkpoint_is_finite(kept[0])


def test_export_verifies_the_checkpoint(
    tmp_path: Path, run_copy: TrainConfig, caplog: pytest.LogCaptureFixture
) -> None:
    from parallm.train.export import export_checkpoint

    newest = checkpoint(run_copy, 4)
    overwrite_middle(largest_shard(newest), b"\0" * 4096)
    with pytest.raises(ValueError, match=f"checkpoint {newest} is damaged"):
        export_checkpoint(newest, tmp_path / "out")
    caplog.set_level(logging.WARNING)
    assert export_checkpoint(run_copy.checkpoint_dir, tmp_path / "out").name == "step-00000002"
    assert warnings_naming(caplog, newest)
