"""``parallm train``: train a model from a TOML config (one process; torchrun for many)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``parallm train`` and ``python -m parallm.train`` (torchrun)."""
    p.add_argument("--config", type=Path, default=None, help="TOML file with [model], [data], ...")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set training.steps=100",
    )
    p.add_argument("--plot", action="store_true", help="write <logging.dir>/loss.png at the end")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (FSDP2 + tensor parallel, resumable checkpoints)",
        description="Train the engine's Llama model on a tokenized corpus (or, with "
        'training.objective = "medusa", Medusa draft heads on a frozen [medusa] target). '
        "Restarting the same "
        "command resumes from the newest intact checkpoint (each carries a manifest of file "
        "digests; a damaged one is skipped with a warning). A NaN or infinite loss stops the "
        'run with exit status 1 (training.on_nonfinite_loss = "rollback" reloads the newest '
        "intact checkpoint and skips the batch instead). For several GPUs run "
        "`torchrun --nproc-per-node N -m parallm.train --config FILE`.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parallm.train.config import TrainConfig
    from parallm.train.telemetry import plot_loss
    from parallm.train.trainer import Trainer, TrainingHalted

    cfg = TrainConfig.load(args.config, args.overrides)
    if cfg.training.objective == "medusa":
        from parallm.train.medusa import MedusaTrainer as Trainer
    with Trainer(cfg) as trainer:
        try:
            history = trainer.train()
        except TrainingHalted as e:
            print(f"parallm train: error: {e}", file=sys.stderr)
            return 1
        if not trainer.dist.is_main:
            return 0
        if history:
            last = history[-1]
            val = f", validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
            print(f"step {last['step']}: loss {last['loss']:.4f}{val}", file=sys.stderr)
            if "val_head_accuracy" in last:
                accuracy = ", ".join(f"{a:.3f}" for a in last["val_head_accuracy"])
                print(f"Medusa heads' validation top-1 accuracy: {accuracy}", file=sys.stderr)
        print(f"checkpoints in {trainer.cfg.checkpoint_dir}", file=sys.stderr)
        if args.plot:
            out = plot_loss(trainer.log.path, Path(cfg.logging.dir) / "loss.png")
            print(f"loss curve in {out}", file=sys.stderr)
    return 0
