"""Checks of a ``training.objective = "medusa"`` config that need no process group.

The target's own sizes (its vocabulary, its positions) are checked against ``[data]`` when the
trainer reads the target's config (``parallm.train.medusa.MedusaTrainer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parallm.train.config import TrainConfig


def check_medusa_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the key of the first bad ``[medusa]`` (or conflicting) value."""
    m = cfg.medusa
    if not m.target:
        raise ValueError(
            'medusa.target is required with training.objective = "medusa": a model directory '
            "or a checkpoint written by `parallm train`"
        )
    if not Path(m.target).is_dir():
        raise ValueError(f"medusa.target: no such directory {m.target}")
    if m.num_heads < 1:
        raise ValueError(f"medusa.num_heads must be >= 1, got {m.num_heads}")
    if m.num_layers < 0:
        raise ValueError(f"medusa.num_layers must be >= 0, got {m.num_layers}")
    if not 0 < m.loss_decay <= 1:
        raise ValueError(f"medusa.loss_decay must be in (0, 1], got {m.loss_decay}")
    if cfg.data.seq_len < m.num_heads + 2:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) must be >= medusa.num_heads + 2 "
            f"({m.num_heads + 2}): head i needs the token i + 2 positions ahead"
        )
    # The target is replicated on every rank and the heads are sharded by FSDP alone.
    for key, value, allowed in (
        ("parallel.tp", cfg.parallel.tp, 1),
        ("parallel.activation_checkpointing", cfg.parallel.activation_checkpointing, False),
        ("parallel.compile", cfg.parallel.compile, False),
    ):
        if value != allowed:
            raise ValueError(
                f'{key} must be {str(allowed).lower()} with training.objective = "medusa", '
                f"got {value!r}"
            )
