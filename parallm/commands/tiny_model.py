"""``parallm make-tiny-model``: a small random Llama with a real tokenizer, for smoke runs."""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="create a small random Llama model directory (for trying the engine)",
        description="Write a Hugging Face directory with a randomly initialised Llama model and "
        "a byte-level BPE tokenizer trained on a few of Python's standard-library sources. Its "
        "output is noise; it exists to exercise the engine end to end without a download.",
    )
    p.add_argument("path", type=Path, help="directory to create")
    p.add_argument("--hidden-size", type=int, default=128, help="model width")
    p.add_argument("--num-layers", type=int, default=4, help="decoder layers")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.set_defaults(func=run)


def stdlib_sample(max_files: int = 40) -> list[str]:
    """Source text of the first few standard-library modules, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:max_files]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def make_tiny_model(
    path: Path, hidden_size: int, num_layers: int, vocab_size: int, seed: int
) -> None:
    import torch
    import transformers

    from parallm.data.bpe import train_bpe

    tokenizer = train_bpe(stdlib_sample(), vocab_size)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 64), max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(args: argparse.Namespace) -> int:
    make_tiny_model(args.path, args.hidden_size, args.num_layers, args.vocab_size, args.seed)
    print(f"wrote a random tiny Llama to {args.path}")
    return 0
