"""Training across processes on CPU with gloo: the real entry points in subprocesses.

One uninterrupted single-process run of 10 steps is the reference; every other layout (FSDP over
2 ranks, TP over 2 ranks, resumed from a checkpoint written by another layout, killed and
restarted) must reproduce its losses to 1e-5 in float32.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import dataset_dir, train_losses, write_config  # noqa: F401 - fixture

from parallm.train.checkpoint import complete_checkpoints
from parallm.train.integrity import MANIFEST, verify_checkpoint

REPO = Path(__file__).parents[2]
TOLERANCE = 1e-5
STEPS = 10
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def launch(
    nproc: int, config: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m parallm.train`` for one process, ``torchrun --standalone`` for several."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "parallm.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "parallm.train"]  # fmt: skip
    cmd += ["--config", str(config), *(f"--set={o}" for o in overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_losses(run_dir: Path, reference: dict[int, float], steps: range) -> None:
    got = train_losses(run_dir)
    assert set(steps) <= set(got), sorted(got)
    for step in steps:
        assert abs(got[step] - reference[step]) <= TOLERANCE, (step, got[step], reference[step])


def resumed_run(tmp_path: Path, dataset: Path, checkpoint: Path) -> Path:
    """A fresh run folder whose only checkpoint is a copy of ``checkpoint``; returns its config."""
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    return write_config(tmp_path / "run.toml", dataset, run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Path:  # noqa: F811
    """One process, 10 steps, checkpoints at steps 5 and 10."""
    tmp_path = tmp_path_factory.mktemp("reference")
    launch(1, write_config(tmp_path / "run.toml", dataset_dir, tmp_path / "run"))
    return tmp_path / "run"


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Path:  # noqa: F811
    """FSDP over 2 ranks (dp=2), the same global batch of 8 sequences."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    launch(2, write_config(tmp_path / "run.toml", dataset_dir, tmp_path / "run"))
    return tmp_path / "run"


def test_fsdp_two_ranks_matches_one_rank(reference: Path, fsdp2: Path) -> None:
    assert_same_losses(fsdp2, train_losses(reference), range(1, STEPS + 1))


def test_two_rank_checkpoints_digest_both_ranks_shards(fsdp2: Path) -> None:
    """Rank 0 writes the manifest once every rank's shards exist, so it lists them all."""
    checkpoints = complete_checkpoints(fsdp2 / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000005", "step-00000010"]
    for checkpoint in checkpoints:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json"} <= set(files)
        assert verify_checkpoint(checkpoint) is True


def test_two_ranks_resume_past_a_damaged_checkpoint(
    tmp_path: Path,
    reference: Path,
    fsdp2: Path,
    dataset_dir: Path,  # noqa: F811
) -> None:
    """Rank 1's shard of the newest checkpoint is overwritten in place: both ranks skip it."""
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp2 / "checkpoints", run_dir / "checkpoints")
    damaged = run_dir / "checkpoints" / "step-00000010"
    shard = damaged / "__1_0.distcp"
    with shard.open("r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(b"\0" * 4096)
    result = launch(2, write_config(tmp_path / "run.toml", dataset_dir, run_dir))
    assert f"checkpoint {damaged} is damaged: __1_0.distcp does not match" in result.stderr
    assert "step-00000005 (step 5)" in result.stderr
    assert_same_losses(run_dir, train_losses(reference), range(6, STEPS + 1))


def test_tensor_parallel_two_matches_one(
    tmp_path: Path,
    reference: Path,
    dataset_dir: Path,  # noqa: F811
) -> None:
    """Also: FSDP2 warns when a wrapped layer returns a view (an in-place op on it would drop
    the pre-backward hook and skip an all-gather); here that warning is an error in every
    rank."""
    config = write_config(tmp_path / "run.toml", dataset_dir, tmp_path / "run")
    launch(2, config, "parallel.tp=2", env={"PYTHONWARNINGS": "error:FSDP2-wrapped module"})
    assert_same_losses(tmp_path / "run", train_losses(reference), range(1, STEPS + 1))


def test_two_rank_checkpoint_resumes_on_one_rank(
    tmp_path: Path,
    reference: Path,
    fsdp2: Path,
    dataset_dir: Path,  # noqa: F811
) -> None:
    config = resumed_run(tmp_path, dataset_dir, fsdp2 / "checkpoints" / "step-00000005")
    result = launch(1, config)
    assert "step-00000005 (step 5)" in result.stderr
    assert_same_losses(tmp_path / "run", train_losses(reference), range(6, STEPS + 1))


def test_one_rank_checkpoint_resumes_with_tp2(
    tmp_path: Path,
    reference: Path,
    dataset_dir: Path,  # noqa: F811
) -> None:
    config = resumed_run(tmp_path, dataset_dir, reference / "checkpoints" / "step-00000005")
    result = launch(2, config, "parallel.tp=2")
    assert "step-00000005 (step 5)" in result.stderr
    assert_same_losses(tmp_path / "run", train_losses(reference), range(6, STEPS + 1))


_KILL_AT_STEP_7 = """
import os, signal, sys
from parallm.train import TrainConfig, Trainer

def kill(metrics):
    if metrics["step"] == 7:  # after the step-6 save started: it may be mid-write
        os.kill(os.getpid(), signal.SIGKILL)

Trainer(TrainConfig.load(sys.argv[1])).train(on_step=kill)
"""


def test_killed_run_restarts_and_matches(
    tmp_path: Path,
    reference: Path,
    dataset_dir: Path,  # noqa: F811
) -> None:
    config = write_config(tmp_path / "run.toml", dataset_dir, tmp_path / "run", checkpoint__every=2)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT_STEP_7, str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    result = launch(1, config)  # the same command, started again
    match = re.search(r"resumed from .*step-(\d+) \(step (\d+)\)", result.stderr)
    assert match is not None, result.stderr[-4000:]
    assert int(match.group(2)) in (4, 6)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))
    assert_same_losses(tmp_path / "run", train_losses(reference), range(1, STEPS + 1))
