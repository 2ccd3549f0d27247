"""Medusa-1 draft heads trained on a frozen target's hidden states (``training.objective =
"medusa"``).

The target (a model directory or a ``parallm train`` checkpoint) is loaded on every rank in the
compute dtype, frozen, and run without gradients; its final hidden states (after the final norm)
feed the heads, which alone are trained, sharded by FSDP over the data-parallel ranks, and
checkpointed. Head ``i`` at position ``t`` is scored against the token at ``t + i + 2``; the loss
is ``sum_i loss_decay**i * CE_i`` (Medusa-1). Each step logs every head's loss and top-1
accuracy (``head_loss``, ``head_accuracy``; ``val_head_accuracy`` at evaluations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallm.config import ModelConfig
from parallm.engine.spec.medusa_heads import MedusaConfig, MedusaHeads
from parallm.models.loader import load_model
from parallm.train import telemetry
from parallm.train.checkpoint import resolve_checkpoint
from parallm.train.config import TrainConfig
from parallm.train.data import eval_batches
from parallm.train.export import load_checkpoint_model
from parallm.train.integrity import CheckpointError
from parallm.train.medusa_export import is_medusa_checkpoint
from parallm.train.parallelize import compute_dtype
from parallm.train.trainer import Trainer


class MedusaTarget:
    """Where the frozen target's weights, config and tokenizer are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_checkpoint = not (path / "config.json").is_file() or (path / ".metadata").exists()
        if self.is_checkpoint:
            try:
                path = resolve_checkpoint(path)  # verified against its manifest
            except CheckpointError as e:  # a checkpoint, but damaged
                raise ValueError(f"medusa.target: {e}") from None
            except ValueError as e:
                raise ValueError(
                    f"medusa.target: {path} is neither a model directory (config.json and "
                    f"safetensors) nor a training checkpoint ({e})"
                ) from None
        if is_medusa_checkpoint(path):
            raise ValueError(f"medusa.target: {path} holds Medusa heads, not a model to draft for")
        self.source = path
        self.hf_config = json.loads((path / "config.json").read_text())
        self.config = ModelConfig.from_dict(self.hf_config)

    @property
    def tokenizer_dir(self) -> Path | None:
        folder = self.source / "tokenizer" if self.is_checkpoint else self.source
        return folder if (folder / "tokenizer_config.json").is_file() else None

    def load(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The target on ``device`` in ``dtype``, in eval mode with no parameter needing grad."""
        if self.is_checkpoint:
            model, _ = load_checkpoint_model(self.source)
            model = model.to(device=device, dtype=dtype)
        else:
            cfg = self.config
            model = load_model(self.source, cfg, dtype, device, cfg.max_position_embeddings)
        return model.eval().requires_grad_(False)


def head_losses(
    logits: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head summed cross-entropy, correct top-1 guesses and scored tokens, each [heads].

    ``logits``: [heads, B, S, V] from the hidden states of ``tokens[:, :-1]`` ([B, S + 1]);
    head i at position t is scored against ``tokens[:, t + i + 2]``, so its last i + 1
    positions have no label. ``weight`` [B] (0 or 1) drops padding rows.
    """
    num_heads, _, seq_len, _ = logits.shape
    sums, correct, counts = [], [], []
    for i in range(num_heads):
        scored = logits[i, :, : seq_len - 1 - i].float()  # [B, S - 1 - i, V]
        labels = tokens[:, i + 2 :]
        row_weight = torch.ones(labels.shape[0], device=labels.device) if weight is None else weight
        token_weight = row_weight[:, None].expand_as(labels).to(scored.dtype)
        per_token = F.cross_entropy(scored.transpose(1, 2), labels, reduction="none")
        sums.append((per_token * token_weight).sum())
        with torch.no_grad():
            correct.append(((scored.argmax(-1) == labels) * token_weight).sum())
            counts.append(token_weight.sum())
    return torch.stack(sums), torch.stack(correct), torch.stack(counts)


def decay_weights(num_heads: int, decay: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([decay**i for i in range(num_heads)], device=device)


def shard_heads(heads: MedusaHeads, dp_mesh: Any, param_dtype: torch.dtype) -> MedusaHeads:
    """FSDP2 over the data-parallel ranks: one unit per head (each has a vocabulary-sized
    projection), fp32 masters and gradient reduction, compute in ``param_dtype``."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for head in heads.medusa_head:
        fully_shard(head, mesh=dp_mesh, mp_policy=policy)
    fully_shard(heads, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return heads


class MedusaTrainer(Trainer):
    """:class:`Trainer` whose trained (and checkpointed) model is the heads; the target is
    ``self.target``, frozen."""

    def _setup(self, cfg: TrainConfig) -> None:
        self.medusa_target = MedusaTarget(Path(cfg.medusa.target))
        _check_target_fits_data(cfg, self.medusa_target)
        if not cfg.data.tokenizer and cfg.data.corpus != "synthetic":
            # The corpus must be tokenized as the target was trained.
            tokenizer = self.medusa_target.tokenizer_dir
            if tokenizer is None:
                raise ValueError(
                    f"data.tokenizer: medusa.target {cfg.medusa.target} has no tokenizer; "
                    "set data.tokenizer to the target's tokenizer directory"
                )
            cfg.data.tokenizer = str(tokenizer)
        self._head_stats: torch.Tensor | None = None
        super()._setup(cfg)

    def _build_model(self, cfg: TrainConfig) -> nn.Module:
        target_cfg = self.medusa_target.config
        self.model_config = target_cfg
        dtype = compute_dtype(cfg.parallel, self.device.type)
        self.target = self.medusa_target.load(self.device, dtype)
        m = cfg.medusa
        self.heads_config = MedusaConfig(
            target_cfg.hidden_size, target_cfg.vocab_size, m.num_heads, m.num_layers
        )
        heads = MedusaHeads(self.heads_config).to(self.device)  # float32 masters
        heads.init_projections_from(self.target.lm_head.weight.float())
        self.decay = decay_weights(m.num_heads, m.loss_decay, self.device)
        return shard_heads(heads, self.mesh["dp"], dtype)

    def _flops_per_token(self) -> float:
        # The target's forward (a third of its training FLOPs) plus the heads' forward and
        # backward (6 x their parameters, all in matmuls).
        target = telemetry.flops_per_token(self.model_config, self.cfg.data.seq_len) / 3
        h, v = self.heads_config.hidden_size, self.heads_config.vocab_size
        per_head = self.heads_config.num_layers * h * h + h * v
        return target + 6 * self.heads_config.num_heads * per_head

    def _write_assets(self, folder: Path) -> None:
        config = {
            **self.heads_config.to_json_dict(),
            "base_model_name_or_path": str(self.medusa_target.path),
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    def _head_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.target(tokens[:, :-1])
        return self.model(hidden)  # [heads, B, S, V]

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device, non_blocking=True)
        sums, correct, counts = head_losses(self._head_logits(tokens), tokens)
        stats = torch.stack([sums.detach(), correct, counts])
        self._head_stats = stats if self._head_stats is None else self._head_stats + stats
        return (self.decay * sums / counts).sum()

    def _step_metrics(self, *args: Any) -> dict[str, Any]:
        metrics = super()._step_metrics(*args)
        stats, self._head_stats = self._head_stats, None
        metrics.update(_head_metrics(stats, ""))
        return metrics

    @torch.no_grad()
    def _evaluate_heads(self) -> tuple[float, dict[str, Any]]:
        t = self.cfg.training
        stats = torch.zeros(3, self.heads_config.num_heads, device=self.device)
        # Every rank runs the same number of forwards (FSDP gathers in each); padding rows
        # weigh nothing.
        for tokens, weight in eval_batches(
            self.val_source, t.eval_samples, t.micro_batch_size, self.dp_rank, self.cfg.parallel.dp
        ):
            tokens, weight = tokens.to(self.device), weight.to(self.device)
            sums, correct, counts = head_losses(self._head_logits(tokens), tokens, weight)
            stats += torch.stack([sums, correct, counts])
        dist.all_reduce(stats)
        loss = (self.decay * stats[0] / stats[2]).sum().item()
        return loss, _head_metrics(stats, "val_", reduce=False)

    def evaluate(self) -> float:
        """The weighted Medusa loss over the held-out sequences."""
        return self._evaluate_heads()[0]

    def evaluate_metrics(self) -> dict[str, Any]:
        loss, heads = self._evaluate_heads()
        return {"val_loss": loss, **heads}


def _head_metrics(stats: torch.Tensor | None, prefix: str, reduce: bool = True) -> dict[str, Any]:
    """``{prefix}head_loss`` and ``{prefix}head_accuracy`` lists from summed [3, heads] stats."""
    if stats is None:
        return {}
    if reduce:
        stats = stats.clone()
        dist.all_reduce(stats)
    sums, correct, counts = stats.tolist()
    return {
        f"{prefix}head_loss": [s / max(c, 1) for s, c in zip(sums, counts, strict=True)],
        f"{prefix}head_accuracy": [k / max(c, 1) for k, c in zip(correct, counts, strict=True)],
    }


def _check_target_fits_data(cfg: TrainConfig, target: MedusaTarget) -> None:
    tc = target.config
    if cfg.data.vocab_size != tc.vocab_size:
        raise ValueError(
            f"data.vocab_size ({cfg.data.vocab_size}) must equal the vocab_size of "
            f"medusa.target ({tc.vocab_size})"
        )
    if cfg.data.seq_len > tc.max_position_embeddings:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) must be <= the max_position_embeddings of "
            f"medusa.target ({tc.max_position_embeddings})"
        )
