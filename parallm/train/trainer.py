"""The training loop: data, parallel model, optimizer, checkpoints and telemetry put together.

Usable from the command line (``parallm train``, ``torchrun -m parallm.train``) and from code::

    trainer = Trainer(TrainConfig.load("configs/train/code-model.toml"))
    metrics = trainer.train(20)  # one dict per optimizer step
    trainer.close()
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallm.train import checkpoint as ckpt
from parallm.train import telemetry
from parallm.train.config import TrainConfig
from parallm.train.data import DataLoader, eval_batches, prepare_dataset, sample_sources
from parallm.train.distributed import (
    all_reduce_mean,
    barrier,
    build_mesh,
    init_distributed,
)
from parallm.train.integrity import CheckpointError
from parallm.train.model import build_train_model
from parallm.train.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from parallm.train.parallelize import parallelize

StepCallback = Callable[[dict[str, Any]], None]

# Rollbacks allowed without a checkpoint saved in between: a run that diverges again right after
# each rollback is not rescued by skipping more batches.
MAX_ROLLBACKS_PER_CHECKPOINT = 3


class TrainingHalted(RuntimeError):
    """Training stopped on a non-finite loss or state; nothing non-finite was saved."""


class Trainer:
    """Sets up everything for ``cfg`` (resuming from the newest checkpoint if any) on creation."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = copy.deepcopy(cfg)  # validate() resolves parallel.dp in place
        self.dist = init_distributed(self.cfg.training.device)
        try:
            self._setup(self.cfg)
        except BaseException:
            # A failed setup (bad config, no intact checkpoint) leaves no process group behind.
            if self.dist.owns_group:
                dist.destroy_process_group()
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        cfg.validate(self.dist.world_size)
        self.device = self.dist.device
        self.mesh = build_mesh(self.device, cfg.parallel.dp, cfg.parallel.tp)
        self.dp_rank = self.mesh["dp"].get_local_rank()

        self.dataset = self._prepare_data()
        train_source, self.val_source = sample_sources(cfg.data, self.dataset)
        self.loader = DataLoader(
            train_source, cfg.training.global_batch_size, cfg.training.micro_batch_size,
            self.dp_rank, cfg.parallel.dp,
        )  # fmt: skip

        self.model = self._build_model(cfg)
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(self.model, cfg.optim)

        self.checkpointer = ckpt.Checkpointer(
            cfg.checkpoint_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save,
            self.dist.is_main, self._write_assets,
        )  # fmt: skip
        self.step = 0
        self.resumed_from: Path | None = None
        # Global batches (by their first sample's index) that gave a non-finite loss: skipped.
        self.skipped_batches: set[int] = set()
        self._rollbacks = 0  # since the last save
        self.batch_start = 0  # the current global batch's first sample
        if cfg.checkpoint.resume:
            self._resume()

        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
        self.flops_per_token = self._flops_per_token()
        self.peak_flops = telemetry.device_peak_flops(self.device, cfg.logging.peak_flops)
        self.log = (
            telemetry.MetricsLog(Path(cfg.logging.dir) / "metrics.jsonl")
            if self.dist.is_main
            else None
        )

    # -- setup ---------------------------------------------------------------------------------

    def _prepare_data(self) -> Any:
        # One process per machine builds the dataset (it is deterministic, so every machine
        # builds the same one); the others wait, then read it.
        builder = self.dist.local_rank == 0
        if builder:
            dataset = prepare_dataset(self.cfg.data, build=True)
        barrier(self.device)
        if not builder:
            dataset = prepare_dataset(self.cfg.data, build=False)
        return dataset

    def _build_model(self, cfg: TrainConfig) -> torch.nn.Module:
        """The parallelized model to train (and so to checkpoint); sets ``model_config``."""
        self.model_config = cfg.model_config()
        model = build_train_model(
            self.model_config, cfg.model.max_position_embeddings, self.device,
            cfg.model.init_std, cfg.training.seed,
        )  # fmt: skip
        return parallelize(model, self.mesh, cfg.parallel)

    def _flops_per_token(self) -> float:
        return telemetry.flops_per_token(self.model_config, self.cfg.data.seq_len)

    def _resume(self) -> bool:
        """Load the newest intact checkpoint (damaged ones are skipped with a warning)."""
        found = self.checkpointer.resume(self.model, self.optimizer)
        if found is None:
            return False
        self.resumed_from, state = found
        self.step = state["step"]
        self.loader.load_state_dict(state["dataloader"])
        self.skipped_batches.update(state.get("skipped_batches", []))
        return True

    def _write_assets(self, folder: Path) -> None:
        """Make a checkpoint self-contained: model config, tokenizer and the training config."""
        hf = self.cfg.hf_model_dict(self.dataset.bos_token_id, self.dataset.eos_token_id)
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (folder / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        if self.dataset.directory is not None:
            shutil.copytree(self.dataset.directory / "tokenizer", folder / "tokenizer")

    # -- one step ------------------------------------------------------------------------------

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a [B, S + 1] batch, computed in float32."""
        tokens = tokens.to(self.device, non_blocking=True)
        logits = self.model.compute_logits(self.model(tokens[:, :-1]))
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over one global batch; returns its metrics."""
        start = time.perf_counter()
        while self.loader.samples_seen in self.skipped_batches:
            self.loader.skip_batch()
        self.batch_start = self.loader.samples_seen
        micro_batches = self.loader.next_batch()
        total = torch.zeros((), device=self.device)
        for tokens in micro_batches:
            # Every micro-batch has the same number of tokens, so the mean of micro-batch
            # means is the batch mean; FSDP then averages over data-parallel ranks.
            loss = self._loss(tokens) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        lr = lr_at(self.step, self.cfg.optim, self.cfg.training.steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_value = all_reduce_mean(total).item()  # also waits for the device
        return self._step_metrics(loss_value, lr, grad_norm.item(), time.perf_counter() - start)

    def _step_metrics(
        self, loss: float, lr: float, grad_norm: float, seconds: float
    ) -> dict[str, Any]:
        tokens_per_s = self.tokens_per_step / seconds
        mfu = None
        if self.peak_flops:
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.dist.world_size,
            "mfu": mfu,
            "memory_gib": telemetry.memory_gib(self.device),
            "step_time_s": seconds,
            "tokens_seen": self.loader.samples_seen * self.cfg.data.seq_len,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the held-out sequences (the same ones at every evaluation)."""
        t = self.cfg.training
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for tokens, weight in eval_batches(
            self.val_source, t.eval_samples, t.micro_batch_size, self.dp_rank, self.cfg.parallel.dp
        ):
            tokens, weight = tokens.to(self.device), weight.to(self.device)
            logits = self.model.compute_logits(self.model(tokens[:, :-1])).float()
            per_token = F.cross_entropy(
                logits.transpose(1, 2), tokens[:, 1:], reduction="none"
            )  # [B, S]
            total += (per_token.mean(dim=1) * weight).sum()
            count += weight.sum()
        # Tensor-parallel peers add equal copies to both sums, which cancel in the ratio.
        dist.all_reduce(total)
        dist.all_reduce(count)
        return (total / count).item()

    def evaluate_metrics(self) -> dict[str, Any]:
        """What an evaluation logs: ``val_loss`` (and, in subclasses, more)."""
        return {"val_loss": self.evaluate()}

    # -- the loop ------------------------------------------------------------------------------

    def train(
        self, num_steps: int | None = None, on_step: StepCallback | None = None
    ) -> list[dict[str, Any]]:
        """Run ``num_steps`` more steps (default: up to ``training.steps``); per-step metrics.

        Checkpoints every ``checkpoint.every`` steps and after the last configured step;
        evaluates every ``training.eval_every`` steps and after the last configured step.
        """
        cfg = self.cfg
        last = cfg.training.steps if num_steps is None else self.step + num_steps
        bar = telemetry.ProgressBar(
            cfg.training.steps, self.step, self.dist.is_main and cfg.logging.progress_bar
        )
        if self.resumed_from is not None:
            bar.write(f"resumed from {self.resumed_from} (step {self.step})")
        history: list[dict[str, Any]] = []
        try:
            while self.step < last:
                metrics = self.train_step()
                history.append(metrics)
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    self._non_finite(
                        f"non-finite loss ({metrics['loss']}) or gradient norm "
                        f"({metrics['grad_norm']}) at step {self.step}",
                        bar,
                    )
                    continue
                self._after_step(metrics, bar)
                if on_step is not None:
                    on_step(metrics)
        finally:
            bar.close()
        return history

    def _non_finite(self, what: str, bar: telemetry.ProgressBar) -> None:
        """Apply ``training.on_nonfinite_loss``: raise :class:`TrainingHalted` or roll back."""
        policy = self.cfg.training.on_nonfinite_loss
        if policy == "rollback" and self._rollbacks < MAX_ROLLBACKS_PER_CHECKPOINT:
            self._rollback(what, bar)
            return
        if policy == "rollback":
            reason = (
                f"{MAX_ROLLBACKS_PER_CHECKPOINT} rollbacks since the last checkpoint did not help"
            )
        else:
            reason = (
                "training.on_nonfinite_loss = 'stop'; 'rollback' reloads the newest intact "
                "checkpoint and skips the batch instead"
            )
        self.checkpointer.wait()  # a save in flight holds an earlier, finite state
        newest = self.checkpointer.latest()
        raise TrainingHalted(
            f"{what}: stopping ({reason}). Nothing after the newest checkpoint "
            f"({newest or 'none'}) was saved"
        )

    def _rollback(self, what: str, bar: telemetry.ProgressBar) -> None:
        """Reload the newest intact checkpoint and skip the batch that went non-finite."""
        bad_batch = self.batch_start
        self.checkpointer.wait()  # a save in flight holds an earlier, finite state
        try:
            found = self._resume()
        except CheckpointError as e:
            raise TrainingHalted(f"{what}, and rolling back failed: {e}") from None
        if not found:
            raise TrainingHalted(f"{what}, and there is no checkpoint to roll back to")
        self._rollbacks += 1
        self.skipped_batches.add(bad_batch)
        if self.dist.is_main:
            bar.write(
                f"{what}: rolled back to {self.resumed_from} (step {self.step}); the batch "
                f"starting at sample {bad_batch} will be skipped"
            )

    def _after_step(self, metrics: dict[str, Any], bar: telemetry.ProgressBar) -> None:
        cfg, step = self.cfg, self.step
        final = step == cfg.training.steps
        bar.update(metrics)
        if self.log is not None and (step % cfg.logging.every == 0 or final):
            self.log.write(metrics)
        every = cfg.training.eval_every
        if (every and step % every == 0) or final:
            val = self.evaluate_metrics()
            metrics.update(val)
            if self.log is not None:
                self.log.write({"step": step, **val})
            bar.write(f"step {step}: validation loss {val['val_loss']:.4f}")
        self.checkpointer.poll()
        every = cfg.checkpoint.every
        if (every and step % every == 0) or final:
            try:
                self.save()
            except ckpt.NonFiniteStateError as e:
                self._non_finite(str(e), bar)
                return
        if final:
            self.checkpointer.wait()

    def save(self) -> None:
        """Checkpoint the current step (in the background when ``checkpoint.async_save``)."""
        state = {
            "step": self.step,
            "dataloader": self.loader.state_dict(),
            "tokens_seen": self.loader.samples_seen * self.cfg.data.seq_len,
            "world_size": self.dist.world_size,
            "dp": self.cfg.parallel.dp,
            "tp": self.cfg.parallel.tp,
            "skipped_batches": sorted(self.skipped_batches),
        }
        self.checkpointer.save(self.step, self.model, self.optimizer, state)
        self._rollbacks = 0

    def close(self) -> None:
        """Finish any background save, close the log and leave the process group we made."""
        self.checkpointer.close()
        if self.log is not None:
            self.log.close()
        if self.dist.owns_group:
            dist.destroy_process_group()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
