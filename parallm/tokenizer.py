"""Tokenizer and end-of-sequence ids of a Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """A fast tokenizer through ``transformers.AutoTokenizer`` (local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"tokenizer: cannot load a tokenizer from {path}. Pass tokenizer= (--tokenizer) a "
            "directory or Hub id that has one, or skip_tokenizer_init=True "
            "(--skip-tokenizer-init) to give prompts as token ids and get token ids back. "
            f"transformers said: {' '.join(str(e).split())}"
        ) from e


def eos_token_ids(path: str | Path | None, tokenizer: Any | None) -> tuple[int, ...]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name if path is not None else None
        if file is not None and file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (int(value),)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (int(tokenizer.eos_token_id),)
    return ()


def id_tokenizer(vocab_size: int) -> Any:
    """The tokenizer of a model with dummy weights and no tokenizer files: token ``i`` is the
    text ``<i>``, with no special tokens. Random weights produce random ids; this makes them
    readable text, so that streamed completions carry one non-empty piece per token, as a real
    model's do, and a serving benchmark times them. Text that is not ``<i>`` pieces maps to 0.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<\d+>"), "isolated")]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
