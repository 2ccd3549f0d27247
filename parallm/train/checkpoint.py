"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<dir>``::

    step-00000200/           complete: DCP shards + .metadata, train_state.json, assets
    step-00000300.partial/   being written (or abandoned by a killed run): never loaded

Each rank writes its own shards into ``step-N.partial``; once the save has finished on every
rank, rank 0 adds ``train_state.json`` and the assets, then renames the folder to ``step-N``.
The rename is atomic, so a folder without the suffix is always complete. DCP stores global
shapes and offsets, so a checkpoint loads on any number of ranks and any TP size.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step-(\d{8})$")
PARTIAL_SUFFIX = ".partial"
TRAIN_STATE = "train_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders under ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / ".metadata").exists() and (path / TRAIN_STATE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest complete one under it."""
    if (path / ".metadata").exists() and (path / TRAIN_STATE).exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ValueError(f"--checkpoint: no complete checkpoint at or under {path}")
    return found[-1]


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAIN_STATE).read_text())


class Checkpointer:
    """Saves (optionally in the background) and loads model + optimizer + trainer state.

    ``write_assets(folder)`` is called on rank 0 before a checkpoint is made complete, to add
    files that make it self-contained (model config, tokenizer).
    """

    def __init__(
        self,
        directory: Path,
        keep: int,
        async_save: bool,
        is_main: bool,
        write_assets: Callable[[Path], None] | None = None,
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.async_save = async_save
        self.is_main = is_main
        self.write_assets = write_assets
        # A dedicated gloo group: the background save's collectives must not interleave with
        # training's collectives on the default group (and gloo runs them on the CPU).
        self.group = dist.new_group(backend="gloo")
        self._pending: tuple[Future, Path, dict[str, Any]] | None = None
        if is_main:
            self._remove_partials()

    def _remove_partials(self) -> None:
        # Left by a run killed mid-save; they are never loaded, so they only take disk space.
        if self.directory.is_dir():
            for path in self.directory.glob(f"step-*{PARTIAL_SUFFIX}"):
                shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (all ranks get the same answer)."""
        found = complete_checkpoints(self.directory) if self.is_main else []
        choice = [str(found[-1]) if found else None]
        dist.broadcast_object_list(choice, src=0, group=self.group)
        return Path(choice[0]) if choice[0] else None

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Start saving; returns once the tensors are staged (async) or written (sync)."""
        self.wait()  # at most one save in flight: bounds host memory and keeps order
        partial = self.directory / (step_dir_name(step) + PARTIAL_SUFFIX)
        model_state, optim_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optim": optim_state}
        if self.async_save:
            future = dcp.async_save(payload, checkpoint_id=str(partial), process_group=self.group)
            self._pending = (future, partial, state)
        else:
            dcp.save(payload, checkpoint_id=str(partial), process_group=self.group)
            self._finalize(partial, state)

    def poll(self) -> None:
        """Complete a finished background save without waiting for an unfinished one."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and made complete."""
        if self._pending is None:
            return
        future, partial, state = self._pending
        self._pending = None
        future.result()
        self._finalize(partial, state)

    def _finalize(self, partial: Path, state: dict[str, Any]) -> None:
        # Rank 0's save returns only after every rank's shards are written (DCP gathers their
        # results before writing .metadata), so it alone can declare the checkpoint complete.
        if not self.is_main:
            return
        if self.write_assets is not None:
            self.write_assets(partial)
        (partial / TRAIN_STATE).write_text(json.dumps(state, indent=2) + "\n")
        final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Load ``path`` into the (already parallelized) model and optimizer; return its state."""
        model_state, optim_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optim": optim_state}
        dcp.load(payload, checkpoint_id=str(path), process_group=self.group)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=payload["model"],
            optim_state_dict=payload["optim"],
        )
        return read_train_state(path)

    def close(self) -> None:
        self.wait()
