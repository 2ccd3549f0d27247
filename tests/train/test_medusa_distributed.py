"""Medusa heads trained over 2 data-parallel ranks (torchrun, gloo, CPU) reproduce one rank's
losses; the heads are FSDP-sharded, the frozen target replicated."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_medusa import corpus, medusa_raw, target  # noqa: F401 - fixtures
from test_train import train_losses, write_toml
from test_train_distributed import TOLERANCE, launch

pytestmark = pytest.mark.slow

STEPS = 6


def write_medusa_config(path: Path, run: Path, target: Path, corpus: Path) -> Path:  # noqa: F811
    raw = medusa_raw(run, target, corpus, training__steps=STEPS, checkpoint__every=3)
    return write_toml(path, raw)


def test_two_ranks_match_one_rank(tmp_path: Path, target: Path, corpus: Path) -> None:  # noqa: F811
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"dp{nproc}"
        run.mkdir()
        # One dataset for both runs: the first run builds it, the second reuses it.
        config = write_medusa_config(run / "run.toml", run, target, corpus)
        config.write_text(config.read_text().replace(str(run / "data"), str(tmp_path / "data")))
        launch(nproc, config)
        runs[nproc] = train_losses(run / "run")
    assert sorted(runs[2]) == list(range(1, STEPS + 1))
    for step, loss in runs[1].items():
        assert abs(runs[2][step] - loss) <= TOLERANCE, (step, runs[2][step], loss)
