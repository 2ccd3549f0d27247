"""Medusa-1 draft heads: extra next-next-token predictors on the target's last hidden state.

Head ``i`` reads the target's final hidden state (after the final norm) at the position whose
next token is being predicted and predicts the token ``i + 2`` positions ahead; the target's own
LM head gives the token ``i + 1`` ahead. Each head is ``num_layers`` residual blocks
(``x + SiLU(Linear(x))``) and a bias-free projection to the vocabulary, named as in
FasterDecoding/Medusa (``medusa_head.{i}.{j}.linear.weight``/``bias`` for the blocks and
``medusa_head.{i}.{num_layers}.weight`` for the projection), so its published heads load too.

A heads folder holds ``config.json`` (Medusa's keys ``medusa_num_heads``/``medusa_num_layers``
plus ``hidden_size``/``vocab_size``), ``medusa_lm_head.safetensors`` and, when parallm wrote it,
a ``manifest.json`` of xxh3 digests (``parallm.train.integrity``) that is checked before loading.
Folders from Medusa itself (no manifest, and possibly ``medusa_lm_head.pt`` weights with the
sizes only in the weights) load unverified.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "medusa_lm_head.safetensors"
TORCH_WEIGHTS_FILE = "medusa_lm_head.pt"  # Medusa-1's own releases
PREFIX = "medusa_head."
ARCHITECTURE = "MedusaHeads"


@dataclass(frozen=True)
class MedusaConfig:
    """The heads' shape: the target's ``hidden_size`` and ``vocab_size``, how many heads, and
    how many residual blocks each head has before its projection."""

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1

    def __post_init__(self) -> None:
        for name, minimum in (("hidden_size", 1), ("vocab_size", 1), ("num_heads", 1),
                              ("num_layers", 0)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"medusa.{name} must be an integer >= {minimum}, got {value!r}")

    def to_json_dict(self) -> dict[str, Any]:
        """Medusa's own keys (so Medusa reads the folder) plus the sizes parallm checks."""
        return {
            "architectures": [ARCHITECTURE],
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "medusa_num_heads": self.num_heads,
            "medusa_num_layers": self.num_layers,
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], weights: dict[str, torch.Tensor] | None = None):
        """Read parallm's or Medusa's ``config.json``; sizes missing there (Medusa's own
        config names only the base model) come from the weights' shapes."""
        num_heads = d.get("medusa_num_heads", d.get("num_heads"))
        num_layers = d.get("medusa_num_layers", d.get("num_layers", 1))
        hidden, vocab = d.get("hidden_size"), d.get("vocab_size")
        if (hidden is None or vocab is None) and weights is not None and num_heads is not None:
            projection = weights.get(f"{PREFIX}0.{num_layers}.weight")
            if projection is not None:
                vocab, hidden = (vocab or projection.shape[0]), (hidden or projection.shape[1])
        missing = [k for k, v in (("medusa_num_heads", num_heads), ("hidden_size", hidden),
                                  ("vocab_size", vocab)) if v is None]  # fmt: skip
        if missing:
            raise ValueError(f"Medusa heads config.json lacks {missing}")
        return cls(hidden_size=hidden, vocab_size=vocab, num_heads=num_heads, num_layers=num_layers)


class ResBlock(nn.Module):
    """``x + SiLU(Linear(x))``; the linear starts at zero, so a new block is the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """``num_heads`` heads; ``forward(hidden[N, H]) -> logits[num_heads, N, V]``."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        self.medusa_head = nn.ModuleList(
            nn.Sequential(
                *(ResBlock(config.hidden_size) for _ in range(config.num_layers)),
                nn.Linear(config.hidden_size, config.vocab_size, bias=False),
            )
            for _ in range(config.num_heads)
        )

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self.medusa_head])

    def init_projections_from(self, lm_head_weight: torch.Tensor) -> None:
        """Start every head's projection at the target's LM head, as Medusa's training does:
        with zero residual blocks each head then begins as the target's next-token guess."""
        with torch.no_grad():
            for head in self.medusa_head:
                head[-1].weight.copy_(lm_head_weight)


def save_medusa_heads(
    heads: MedusaHeads,
    out: Path,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> None:
    """Write ``out/config.json``, ``out/medusa_lm_head.safetensors`` and the digest manifest
    (last, so a folder whose files differ from it was damaged after it was written).
    ``base_model``: the target the heads were trained on, recorded as Medusa does."""
    from parallm.train.integrity import write_manifest  # see _verify_folder

    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        PREFIX + name.removeprefix(PREFIX): t.detach().to("cpu", dtype or t.dtype).contiguous()
        for name, t in heads.state_dict().items()
    }
    config = heads.config.to_json_dict()
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    write_manifest(out)


def load_medusa_heads(
    path: str | Path,
    target_model_config: Any,
    device: torch.device | str,
    dtype: torch.dtype,
    num_speculative_tokens: int | None = None,
) -> MedusaHeads:
    """Heads from a folder written by ``parallm export`` (or Medusa), checked against the target.

    ``target_model_config`` is the target's ``ModelConfig`` (anything with ``hidden_size`` and
    ``vocab_size``). Raises ``ValueError`` naming the field when the sizes differ from the
    target's or ``num_speculative_tokens`` exceeds the number of heads, and
    ``parallm.train.integrity.CheckpointError`` (a ``ValueError``) when the files do not match the manifest the export wrote.
    """
    folder = Path(path)
    _verify_folder(folder)
    weights = _read_weights(folder)
    config = _read_config(folder, weights)
    _check_matches_target(folder, config, target_model_config)
    if num_speculative_tokens is not None and num_speculative_tokens > config.num_heads:
        raise ValueError(
            f"speculative_config.num_speculative_tokens ({num_speculative_tokens}) must be <= "
            f"the number of Medusa heads ({config.num_heads}) in {folder}"
        )
    heads = MedusaHeads(config)
    weights = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in weights.items()}
    expected = set(heads.state_dict())
    # Medusa-1 shares one block across a head's layers, but its state dict still names each
    # layer, so the names always match ours; missing or unexpected ones mean a wrong file.
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Medusa heads {folder}: weights do not match config.json "
            f"(num_heads={config.num_heads}, num_layers={config.num_layers}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    heads.load_state_dict(weights)
    return heads.to(device=device, dtype=dtype).eval()


def _verify_folder(folder: Path) -> None:
    # Imported here: parallm.train's package init loads the trainer, which serving never needs.
    from parallm.train.integrity import MANIFEST, CheckpointError, verify_checkpoint

    if not folder.is_dir():
        raise ValueError(f"speculative_config.model: Medusa heads folder {folder} does not exist")
    if not (folder / MANIFEST).is_file():
        logger.warning("Medusa heads %s have no %s; loading them unverified", folder, MANIFEST)
        return
    try:
        verify_checkpoint(folder)
    except CheckpointError as e:
        raise CheckpointError(folder, e.problem, subject="Medusa heads") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(str(folder / WEIGHTS_FILE))
    if (folder / TORCH_WEIGHTS_FILE).is_file():
        return torch.load(folder / TORCH_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise ValueError(f"Medusa heads {folder} hold neither {WEIGHTS_FILE} nor {TORCH_WEIGHTS_FILE}")


def _read_config(folder: Path, weights: dict[str, torch.Tensor]) -> MedusaConfig:
    try:
        d = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"Medusa heads {folder}: {CONFIG_FILE} cannot be read ({e})") from None
    named = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in weights.items()}
    return MedusaConfig.from_json_dict(d, named)


def _check_matches_target(folder: Path, config: MedusaConfig, target: Any) -> None:
    for name in ("hidden_size", "vocab_size"):
        ours, theirs = getattr(config, name), getattr(target, name)
        if ours != theirs:
            raise ValueError(
                f"Medusa heads {folder} have {name}={ours}, but the target model has "
                f"{name}={theirs}; train heads for this target"
            )


__all__ = [
    "MedusaConfig",
    "MedusaHeads",
    "ResBlock",
    "load_medusa_heads",
    "save_medusa_heads",
]
