"""A datastore for prompt lookup: a tokenized corpus to draft from where a sequence's own tokens
and the ring of earlier requests give nothing (``prompt_lookup_datastore``).

Retrieval-based speculative decoding (REST, He et al., 2024): code repeats the code it was
written after, so the corpus a model was trained on predicts much of what it writes. The
datastore is the training split of a dataset that ``parallm train`` prepared (``meta.json``,
``tokenizer/``, ``train_*.npy``): it is laid before the ring of earlier requests as a fixed base
(spec/history.py) and searched after it. Offline, on the bundled model's held-out code
(benchmarks/ngram_acceptance.py, ``--datastore``), it drafts in 98% of steps instead of 67-71%
(75-80% with the ring).

Checked when loaded, before the target model: the folder's shards hold the token count its
``meta.json`` records (a truncated or missing shard is refused), its tokenizer is the target's
(the same vocabulary) where both have a ``tokenizer.json``, and every token is in the target's
vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from parallm.data.shards import TokenShards
from parallm.engine.spec.config import DATASTORE_FIELD as FIELD
from parallm.engine.spec.config import DATASTORE_META as META
from parallm.engine.spec.config import MAX_HISTORY_TOKENS, SpeculativeConfig, check_datastore_dir
from parallm.engine.spec.history import SEPARATOR


def datastore_tokens(
    spec: SpeculativeConfig, vocab_size: int, tokenizer_dir: str | Path | None
) -> np.ndarray | None:
    """``spec.prompt_lookup_datastore``'s tokens (``load_datastore``), or None without one."""
    if spec.prompt_lookup_datastore is None:
        return None
    ring = spec.prompt_lookup_history_tokens
    return load_datastore(spec.prompt_lookup_datastore, vocab_size, tokenizer_dir,
                          limit=MAX_HISTORY_TOKENS - 1 - ring)  # fmt: skip


def load_datastore(
    path: str, vocab_size: int, tokenizer_dir: str | Path | None, limit: int = MAX_HISTORY_TOKENS
) -> np.ndarray:
    """The training split of the dataset at ``path`` as int32 tokens, each document's EOS
    replaced by the ring's separator (so that no match or draft crosses documents).
    ``tokenizer_dir``: the target's tokenizer folder, compared with the dataset's. ValueError,
    before reading the shards, when the dataset holds more than ``limit`` tokens (what the
    ring leaves room for)."""
    check_datastore_dir(path)
    folder = Path(path)
    recorded = json.loads((folder / META).read_text())["stats"]["train"]["tokens"]
    if recorded > limit:
        raise ValueError(
            f"{FIELD}: {path} holds {recorded} training tokens; with "
            f"prompt_lookup_history_tokens the ring holds at most {MAX_HISTORY_TOKENS} tokens, "
            f"which leaves {limit} for the datastore"
        )
    shards = TokenShards(folder, "train")
    if len(shards) != recorded or not recorded:
        raise ValueError(
            f"{FIELD}: {path} holds {len(shards)} training tokens where its {META} records "
            f"{recorded}: a shard is missing or damaged; prepare the dataset again"
        )
    _check_tokenizer(folder / "tokenizer", tokenizer_dir)
    tokens = shards.read(0, recorded).astype(np.int32)
    if int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"{FIELD}: {path} holds token {int(tokens.max())}, outside the target's vocabulary "
            f"of {vocab_size}: it was tokenized for another model"
        )
    tokens[tokens == _eos_id(folder / "tokenizer")] = SEPARATOR
    return tokens


def _check_tokenizer(dataset_tokenizer: Path, tokenizer_dir: str | Path | None) -> None:
    from tokenizers import Tokenizer

    mine = dataset_tokenizer / "tokenizer.json"
    theirs = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir is not None else None
    if theirs is None or not theirs.is_file() or not mine.is_file():
        return
    if Tokenizer.from_file(str(mine)).get_vocab() != Tokenizer.from_file(str(theirs)).get_vocab():
        raise ValueError(
            f"{FIELD}: the dataset's tokenizer ({mine}) is not the target's ({theirs}): its "
            "tokens would draft other text"
        )


def _eos_id(dataset_tokenizer: Path) -> int:
    from parallm.tokenizer import load_tokenizer

    eos = load_tokenizer(dataset_tokenizer).eos_token_id
    if eos is None:
        raise ValueError(f"{FIELD}: the dataset's tokenizer ({dataset_tokenizer}) has no EOS")
    return int(eos)
