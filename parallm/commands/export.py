"""``parallm export``: a training checkpoint to a Hugging Face model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a training checkpoint as a Hugging Face model directory",
        description="Write config.json, model.safetensors, the tokenizer and "
        "generation_config.json from a checkpoint written by `parallm train`. The result loads "
        "in transformers and in `parallm generate --model OUT`. A checkpoint of Medusa heads "
        '(training.objective = "medusa") becomes a heads folder (config.json, '
        "medusa_lm_head.safetensors, manifest.json) for "
        '--speculative-config \'{"method": "medusa", "model": "OUT", ...}\'.',
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint folder (step-N) or a checkpoint directory (its newest intact one is "
        "used); files are checked against the checkpoint's manifest of digests first",
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="dtype of the saved weights (training keeps fp32 masters)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parallm.train.export import export_checkpoint

    source = export_checkpoint(args.checkpoint, args.out, args.dtype)
    print(f"exported {source} to {args.out}", file=sys.stderr)
    return 0
