"""Export a Medusa-heads checkpoint as a heads folder that ``load_medusa_heads`` reads.

Kept apart from ``parallm.train.medusa`` (which needs the model export code) so that
``parallm.train.export`` can dispatch here without an import cycle.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from parallm.engine.spec.medusa_heads import (
    ARCHITECTURE,
    MedusaConfig,
    MedusaHeads,
    save_medusa_heads,
)
from parallm.train.checkpoint import describe_error
from parallm.train.integrity import CheckpointError


def is_medusa_checkpoint(checkpoint: Path) -> bool:
    """Whether a checkpoint holds Medusa heads (its config.json names ``MedusaHeads``)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("architectures") == [ARCHITECTURE]


def load_checkpoint_heads(checkpoint: Path) -> tuple[MedusaHeads, dict]:
    """The float32 heads of a (verified) checkpoint on CPU, and its config dict."""
    config = json.loads((checkpoint / "config.json").read_text())
    heads = MedusaHeads(MedusaConfig.from_json_dict(config))
    with warnings.catch_warnings():
        # DCP warns that it loads in one process; that is the point here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": heads.state_dict()}, checkpoint_id=str(checkpoint), no_dist=True)
    return heads, config


def export_medusa_checkpoint(checkpoint: Path, out: Path, dtype: torch.dtype) -> None:
    """Write the heads folder (config.json, medusa_lm_head.safetensors, manifest.json)."""
    try:
        heads, config = load_checkpoint_heads(checkpoint)
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(checkpoint, f"could not be loaded: {describe_error(e)}") from None
    save_medusa_heads(heads, out, dtype, base_model=config.get("base_model_name_or_path"))
