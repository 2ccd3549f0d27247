"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<dir>``::

    step-00000200/           complete: DCP shards + .metadata, train_state.json, assets
    step-00000300.partial/   being written (or abandoned by a killed run): never loaded

Each rank writes its own shards into ``step-N.partial``; once the save has finished on every
rank, rank 0 adds ``train_state.json``, the assets and a manifest of every file's digest
(``parallm.train.integrity``), then renames the folder to ``step-N``. The rename is atomic, so a
folder without the suffix is always complete, and one whose files no longer match its manifest
was damaged later: resuming skips it (with a warning naming it) for the newest intact one. DCP
stores global shapes and offsets, so a checkpoint loads on any number of ranks and any TP size.
"""

from __future__ import annotations

import json
import logging
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from parallm.train.integrity import (
    MANIFEST,
    TRAIN_STATE,
    CheckpointError,
    verify_checkpoint,
    write_manifest,
)

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
PARTIAL_SUFFIX = ".partial"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_folders(directory: Path) -> list[Path]:
    """Every ``step-N`` folder under ``directory`` (complete by name), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders that have their DCP metadata and train state, oldest first."""
    return [
        path
        for path in checkpoint_folders(directory)
        if (path / ".metadata").exists() and (path / TRAIN_STATE).exists()
    ]


def verify_or_warn(path: Path) -> None:
    """:func:`verify_checkpoint`, warning when ``path`` predates manifests (cannot be verified)."""
    if not verify_checkpoint(path):
        logger.warning(
            "checkpoint %s has no %s (written before checkpoints carried one), so its files "
            "cannot be verified; loading it as it is",
            path,
            MANIFEST,
        )


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint (verified), else the newest intact one under it."""
    if _STEP_DIR.match(path.name) or (path / ".metadata").exists():
        verify_or_warn(path)
        return path
    problems = []
    for candidate in reversed(checkpoint_folders(path)):
        try:
            verify_or_warn(candidate)
            return candidate
        except CheckpointError as e:
            logger.warning("%s; skipping it", e)
            problems.append(str(e))
    if problems:
        raise ValueError(f"--checkpoint: no intact checkpoint under {path}: " + "; ".join(problems))
    raise ValueError(f"--checkpoint: no complete checkpoint at or under {path}")


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAIN_STATE).read_text())


class NonFiniteStateError(RuntimeError):
    """The model or optimizer state holds NaN or infinity, so it is not saved."""


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

    def _broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first, as rank 0 sees them (every rank gets the same)."""
        found = (
            [str(p) for p in reversed(checkpoint_folders(self.directory))] if self.is_main else []
        )
        return [Path(p) for p in self._broadcast(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint folder (not verified), as rank 0 sees it."""
        found = self.candidates()
        return found[0] if found else None

    def resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest intact checkpoint; None if there is none at all.

        A damaged one (digest mismatch, missing or truncated file, load error, non-finite
        values) is skipped with a warning naming it; if every one is damaged, raises
        :class:`CheckpointError` listing them.
        """
        problems = []
        for path in self.candidates():
            try:
                return path, self.load(path, model, optimizer)
            except CheckpointError as e:
                if self.is_main:
                    logger.warning("%s; skipping it", e)
                problems.append(str(e))
        if problems:
            raise CheckpointError(
                self.directory,
                "holds no intact checkpoint to resume from: " + "; ".join(problems) + ". Move "
                "the damaged folders away (or set checkpoint.resume = false) to start afresh",
                subject="checkpoint directory",
            )
        return None

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Start saving; returns once the tensors are staged (async) or written (sync).

        Raises :class:`NonFiniteStateError` (and saves nothing) if any value is NaN or infinite.
        """
        self.wait()  # at most one save in flight: bounds host memory and keeps order
        partial = self.directory / (step_dir_name(step) + PARTIAL_SUFFIX)
        model_state, optim_state = get_state_dict(model, optimizer)
        payload = {"model": model_state, "optim": optim_state}
        if not _all_finite(payload, self.group):
            raise NonFiniteStateError(
                f"the model or optimizer state at step {step} holds NaN or infinite values; "
                "it was not saved"
            )
        state = {**state, "manifest": MANIFEST}  # so a lost manifest is told from none
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
        # results before writing .metadata), so it alone can digest them all and declare the
        # checkpoint complete. The manifest is the last file written before the rename.
        if not self.is_main:
            return
        if self.write_assets is not None:
            self.write_assets(partial)
        (partial / TRAIN_STATE).write_text(json.dumps(state, indent=2) + "\n")
        write_manifest(partial)
        final = partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        self._apply_retention(final)

    def _apply_retention(self, newest: Path) -> None:
        """Keep ``newest`` (just written and digested, so intact) and the ``keep - 1`` others
        with the highest steps. ``newest`` may not have the highest step (a run resumed from an
        older checkpoint because newer ones were damaged), so it is never counted out."""
        others = [p for p in complete_checkpoints(self.directory) if p != newest]
        for old in others[: max(len(others) - (self.keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Verify ``path`` and load it into the (already parallelized) model and optimizer.

        Returns its train state. Any fault raises :class:`CheckpointError` naming ``path``;
        the model and optimizer may then hold part of it, so load another checkpoint next.
        """
        problem = None
        if self.is_main:
            try:
                verify_or_warn(path)
            except CheckpointError as e:
                problem = e.problem
        problem = self._broadcast(problem)
        if problem is not None:
            raise CheckpointError(path, problem)
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            payload = {"model": model_state, "optim": optim_state}
            dcp.load(payload, checkpoint_id=str(path), process_group=self.group)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=payload["model"],
                optim_state_dict=payload["optim"],
            )
            state = read_train_state(path)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise CheckpointError(path, f"could not be loaded: {describe_error(e)}") from None
        if not _all_finite(payload, self.group):
            raise CheckpointError(path, "holds NaN or infinite values")
        return state

    def close(self) -> None:
        self.wait()


def _all_finite(payload: Any, group: dist.ProcessGroup) -> bool:
    """Whether every floating-point value in ``payload`` is finite on every rank."""
    flags = [
        (t.to_local() if isinstance(t, DTensor) else t).isfinite().all()
        for t in tree_leaves(payload)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    ok = (
        torch.stack(flags).all().to("cpu", torch.int32)
        if flags
        else torch.ones((), dtype=torch.int32)
    )
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())


def describe_error(error: BaseException) -> str:
    """One line per distinct cause (DCP gathers each rank's exception with its traceback)."""
    causes = [error]
    if isinstance(error, CheckpointException):
        causes = [exc for exc, _ in error.failures.values()]
    lines = []
    for cause in causes:
        text = str(cause).strip().splitlines()
        line = f"{type(cause).__name__}: {text[0] if text else ''}".strip().rstrip(":")
        if line not in lines:
            lines.append(line[:300])
    return "; ".join(lines)
