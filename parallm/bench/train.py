"""``parallm bench train``: training throughput and MFU of a model shape on synthetic tokens.

The model shape comes from a Hugging Face ``config.json``; the data are uniform random tokens
(``data.corpus = "synthetic"``), so nothing is read from disk and no checkpoint is written. The
real training stack runs: :class:`parallm.train.trainer.Trainer` with FSDP2, mixed precision,
optional tensor parallel, activation checkpointing and ``torch.compile``. After ``--warmup-steps``
untimed steps (allocator warm-up, autotuning, compilation), ``--steps`` optimizer steps are timed,
each between device synchronizations.

One process (CPU or one GPU)::

    parallm bench train --config benchmarks/configs/llama-3.2-1b.json --out runs/bench/1gpu.json

Several GPUs, with scaling efficiency against the one-GPU run::

    torchrun --nproc-per-node 2 -m parallm.bench.train \\
        --config benchmarks/configs/llama-3.2-1b.json \\
        --baseline-json runs/bench/1gpu.json --out runs/bench/2gpu.json

MFU counts the trainer's FLOPs per token (:func:`parallm.train.telemetry.flops_per_token`):
6 x matmul parameters (LM head included) plus 12 x layers x heads x head_dim x seq_len for
attention, with no discount for causal masking (the PaLM / torchtitan convention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from parallm.bench.common import environment, print_table, write_json

if TYPE_CHECKING:  # the training stack is imported only when the benchmark runs
    from parallm.config import ModelConfig
    from parallm.train.config import TrainConfig
    from parallm.train.trainer import Trainer

FLOPS_CONVENTION = (
    "6 x matmul params (LM head included, embedding lookup excluded) "
    "+ 12 x layers x heads x head_dim x seq_len attention (no causal discount; PaLM/torchtitan)"
)

# Settings that must match a baseline for tokens/s per GPU to be comparable (weak scaling: the
# per-rank batch stays fixed while GPUs are added). TP is left out: spreading one model over
# more GPUs is itself a layout whose efficiency against one GPU is worth reporting.
_COMPARABLE = ("model_shape", "seq_len", "micro_batch_size", "grad_accum", "dtype",
               "activation_checkpointing", "compile")  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (``--out`` is added by the caller, as for every benchmark)."""
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        help="Hugging Face config.json (or a directory holding one) giving the model shape",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence")
    p.add_argument(
        "--micro-batch-size", type=int, default=4, help="sequences per forward pass on one rank"
    )
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per rank per optimizer step"
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument(
        "--warmup-steps", type=int, default=5, help="untimed steps first (compilation, allocator)"
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="compute dtype (master weights and optimizer state stay float32)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in backward",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides world size)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to train; auto picks CUDA when present",
    )
    p.add_argument(
        "--peak-flops",
        type=float,
        default=0.0,
        help="peak FLOP/s of one device for MFU; 0: look it up (H100/H200 bf16), else no MFU",
    )
    p.add_argument(
        "--baseline-json",
        type=Path,
        default=None,
        help="JSON of a 1-GPU run of this benchmark: report scaling efficiency against it",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")


def build_config(args: argparse.Namespace, world_size: int, work_dir: Path) -> TrainConfig:
    """A :class:`TrainConfig` for the benchmark, with the model shape of ``args.config``.

    The global batch is ``micro_batch_size x grad_accum x (world_size / tp)``, so every GPU
    does the same work whatever the world size (weak scaling).
    """
    from parallm.config import ModelConfig
    from parallm.train.config import TrainConfig

    file = args.config / "config.json" if args.config.is_dir() else args.config
    if not file.is_file():
        raise ValueError(f"--config: no such file {file}")
    # ModelConfig reads both key layouts (transformers 4.x and 5.x); the trainer builds a Llama
    # of these dimensions whatever the architecture named.
    shape = ModelConfig.from_dict(json.loads(file.read_text()))
    for flag, value in (
        ("--seq-len", args.seq_len),
        ("--micro-batch-size", args.micro_batch_size),
        ("--grad-accum", args.grad_accum),
        ("--steps", args.steps),
        ("--tp", args.tp),
    ):
        if value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if world_size % args.tp:
        raise ValueError(f"--tp ({args.tp}) must divide the world size ({world_size})")
    dp = world_size // args.tp
    raw = {
        "model": {
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "num_hidden_layers": shape.num_hidden_layers,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_key_value_heads,
            "head_dim": shape.head_dim,
            # Only the rotary table depends on this; sized to the sequence, not the model's
            # 128k context. Llama 3 rope scaling changes frequencies, not FLOPs, and is dropped.
            "max_position_embeddings": args.seq_len,
            "rope_theta": float(shape.rope_theta),
            "rms_norm_eps": float(shape.rms_norm_eps),
            "tie_word_embeddings": shape.tie_word_embeddings,
        },
        "data": {
            "corpus": "synthetic",
            "vocab_size": shape.vocab_size,
            "seq_len": args.seq_len,
            "seed": args.seed,
        },
        "training": {
            "steps": args.warmup_steps + args.steps,
            "global_batch_size": args.micro_batch_size * args.grad_accum * dp,
            "micro_batch_size": args.micro_batch_size,
            "seed": args.seed,
            "device": args.device,
        },
        "parallel": {
            "tp": args.tp,
            "dp": dp,
            "activation_checkpointing": args.activation_checkpointing,
            "compile": args.compile,
            "mixed_precision": args.dtype,
        },
        # Nothing is written: the trainer's checkpoint folder and metrics log go to a scratch
        # directory, and the benchmark calls train_step() directly, which never saves.
        "checkpoint": {"dir": str(work_dir / "checkpoints"), "resume": False, "async_save": False},
        "logging": {"dir": str(work_dir), "progress_bar": False, "peak_flops": args.peak_flops},
    }
    return TrainConfig.from_dict(raw)


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously: the clock is read only once the device has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` of all ranks (the slowest rank sets the pace of a step)."""
    import torch.distributed as dist

    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def measure(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the trainer, run the warm-up and timed steps; the result row on rank 0, else None."""
    from parallm.train.distributed import barrier
    from parallm.train.telemetry import flops_per_token
    from parallm.train.trainer import Trainer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory(prefix="parallm-bench-train-") as scratch:
        cfg = build_config(args, world_size, Path(scratch))
        start = time.perf_counter()
        with Trainer(cfg) as trainer:
            setup_s = time.perf_counter() - start
            device = trainer.device
            # train_step() rather than train(): train() evaluates and checkpoints after the
            # configured last step, which a throughput benchmark must not time or write.
            for _ in range(args.warmup_steps):
                trainer.train_step()
            _sync(device)
            barrier(device)  # every rank starts the timed window together
            step_times: list[float] = []
            records: list[dict[str, Any]] = []
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                records.append(trainer.train_step())
                _sync(device)
                step_times.append(time.perf_counter() - t0)
            # The trainer resets the peak after every step, so the run's peak is the max.
            peak_gib = max(r["memory_gib"] for r in records)
            elapsed = _max_over_ranks(sum(step_times), device)
            peak_gib = _max_over_ranks(peak_gib, device)
            if not trainer.dist.is_main:
                return None
            model_config = trainer.model_config
            fpt = flops_per_token(model_config, cfg.data.seq_len)
            row = _result_row(args, cfg, trainer, step_times, elapsed, peak_gib, fpt)
            row["setup_s"] = setup_s
            row["loss_last"] = records[-1]["loss"]
            row["model_shape"] = _shape(model_config)
            row["num_params"] = model_config.num_params
            row["flops_per_token_6n"] = fpt - _attention_flops(model_config, cfg.data.seq_len)
    return row


def _attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    # The attention term of telemetry.flops_per_token, reported separately for transparency.
    return 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    """The model dimensions (resolved, e.g. head_dim), to check a baseline ran the same model."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def _result_row(
    args: argparse.Namespace,
    cfg: TrainConfig,
    trainer: Trainer,
    step_times: list[float],
    elapsed: float,
    peak_gib: float,
    fpt: float,
) -> dict[str, Any]:
    world = trainer.dist.world_size
    tokens = cfg.training.global_batch_size * cfg.data.seq_len * len(step_times)
    tokens_per_s = tokens / elapsed
    per_gpu = tokens_per_s / world
    peak = trainer.peak_flops
    return {
        "device": str(trainer.device),
        "world_size": world,
        "tp": cfg.parallel.tp,
        "dp": cfg.parallel.dp,
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.training.micro_batch_size,
        "grad_accum": cfg.grad_accum_steps,
        "global_batch_size": cfg.training.global_batch_size,
        "tokens_per_step": cfg.training.global_batch_size * cfg.data.seq_len,
        "dtype": args.dtype,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "warmup_steps": args.warmup_steps,
        "steps": len(step_times),
        "step_times_ms": [t * 1e3 for t in step_times],  # rank 0's
        "step_time_ms_mean": elapsed / len(step_times) * 1e3,  # slowest rank's
        "step_time_ms_median": statistics.median(step_times) * 1e3,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu,
        "flops_per_token": fpt,
        "flops_convention": FLOPS_CONVENTION,
        "peak_flops_per_gpu": peak,
        "mfu": per_gpu * fpt / peak if peak else None,
        "achieved_tflops_per_gpu": per_gpu * fpt / 1e12,
        "peak_memory_gib": peak_gib,
        "memory_kind": "CUDA max allocated" if trainer.device.type == "cuda" else "process max RSS",
    }


def scaling_efficiency(row: dict[str, Any], baseline_path: Path) -> dict[str, Any]:
    """Tokens/s per GPU of ``row`` over that of the baseline run, plus mismatched settings."""
    if not baseline_path.is_file():
        raise ValueError(f"--baseline-json: no such file {baseline_path}")
    results = json.loads(baseline_path.read_text()).get("results") or []
    if not results or "tokens_per_s_per_gpu" not in results[0]:
        raise ValueError(f"--baseline-json: {baseline_path} is not a `bench train` result")
    base = results[0]
    mismatched = [k for k in _COMPARABLE if base.get(k) != row.get(k)]
    return {
        "baseline_json": str(baseline_path),
        "baseline_world_size": base.get("world_size"),
        "baseline_tokens_per_s_per_gpu": base["tokens_per_s_per_gpu"],
        "scaling_efficiency": row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"],
        "baseline_mismatch": mismatched,
    }


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Measure, then on rank 0 print the table and write ``--out``; returns the payload there."""
    row = measure(args)
    if row is None:
        return None
    if args.baseline_json is not None:
        row |= scaling_efficiency(row, args.baseline_json)
        if row["baseline_mismatch"]:
            print(
                "warning: the baseline differs in "
                + ", ".join(row["baseline_mismatch"])
                + "; scaling efficiency compares unlike runs",
                file=sys.stderr,
            )
    display = row | {"mfu_pct": None if row["mfu"] is None else 100 * row["mfu"]}
    if row.get("scaling_efficiency") is not None:
        display["scaling_pct"] = 100 * row["scaling_efficiency"]
    print_table([display], [
        ("world_size", "GPUs", "d"), ("tp", "TP", "d"), ("micro_batch_size", "mb", "d"),
        ("grad_accum", "accum", "d"), ("global_batch_size", "batch", "d"),
        ("step_time_ms_mean", "step ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"),
        ("tokens_per_s_per_gpu", "tok/s/GPU", ",.0f"),
        ("achieved_tflops_per_gpu", "TFLOP/s/GPU", ".1f"), ("mfu_pct", "MFU %", ".1f"),
        ("peak_memory_gib", "peak GiB", ".1f"), ("scaling_pct", "scaling %", ".1f"),
    ])  # fmt: skip
    print(f"FLOPs/token {row['flops_per_token']:.4g} = {FLOPS_CONVENTION}")
    payload = {"benchmark": "train", "env": environment(),
               "args": vars(args) | {"func": None}, "results": [row]}  # fmt: skip
    write_json(args.out, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``torchrun --nproc-per-node N -m parallm.bench.train ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m parallm.bench.train", description=__doc__.split("\n\n")[0]
    )
    add_args(parser)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"parallm bench train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
