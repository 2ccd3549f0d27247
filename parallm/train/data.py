"""Training data: build the tokenizer and token shards once, then serve deterministic batches.

Sequences are fixed windows of ``seq_len + 1`` tokens cut from the concatenated documents
(each document ends with EOS), shuffled per epoch with a seeded permutation. The loader's whole
state is one number, the count of sequences consumed over all ranks, so a checkpoint taken on
any data-parallel layout resumes on any other with exactly the next global batch.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from parallm.data.corpus import corpus_digest, is_held_out, read_corpus
from parallm.data.shards import TokenShards, token_dtype, write_shards
from parallm.train.config import DataSection

_META = "meta.json"


@dataclass
class Dataset:
    """A built dataset: where it lives, its tokenizer (None for synthetic data) and statistics."""

    directory: Path | None
    tokenizer: Any | None
    stats: dict[str, Any]

    @property
    def eos_token_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.bos_token_id


def _fingerprint(cfg: DataSection) -> dict[str, Any]:
    # Everything that changes the tokens on disk; a mismatch means the directory is stale.
    fp = {
        "corpus": cfg.corpus,
        "extensions": list(cfg.extensions),
        "max_files": cfg.max_files,
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
    }
    if cfg.corpus in ("stdlib", "python"):
        fp["python"] = platform.python_version()
    if cfg.corpus == "python":
        fp["files"] = corpus_digest(cfg.corpus, tuple(cfg.extensions))
    return fp


def prepare_dataset(cfg: DataSection, build: bool = True) -> Dataset:
    """The dataset of ``cfg``: built into ``cfg.dataset_dir`` when missing (if ``build``).

    Call with ``build=True`` on one process per machine and ``build=False`` (after a barrier)
    on the others.
    """
    if cfg.corpus == "synthetic":
        return Dataset(None, None, {"corpus": "synthetic"})
    directory = Path(cfg.dataset_dir)
    if not (directory / _META).exists() and build:
        _build(cfg, directory)
    if not (directory / _META).exists():
        raise ValueError(f"data.dataset_dir: no dataset at {directory}")
    meta = json.loads((directory / _META).read_text())
    if meta["fingerprint"] != _fingerprint(cfg):
        raise ValueError(
            f"data.dataset_dir {directory} holds a dataset built with other settings "
            f"({meta['fingerprint']}); delete it or choose another data.dataset_dir"
        )
    from parallm.tokenizer import load_tokenizer

    return Dataset(directory, load_tokenizer(directory / "tokenizer"), meta["stats"])


def _build(cfg: DataSection, directory: Path) -> None:
    # Written to a private temporary directory and renamed, so a killed build leaves no
    # half-made dataset that a later run would trust.
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    docs = list(read_corpus(cfg.corpus, tuple(cfg.extensions), cfg.max_files))
    train = [d for d in docs if not is_held_out(d.name, cfg.val_fraction)]
    val = [d for d in docs if is_held_out(d.name, cfg.val_fraction)]
    tokenizer = _tokenizer(cfg, [d.text for d in train])
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    dtype = token_dtype(cfg.vocab_size)
    stats: dict[str, Any] = {"corpus": cfg.corpus, "python": platform.python_version()}
    for split, split_docs in (("train", train), ("val", val)):
        chunks = _encode(tokenizer, [d.text for d in split_docs])
        tokens = write_shards(chunks, tmp, split, cfg.shard_tokens, dtype)
        stats[split] = {
            "documents": len(split_docs),
            "bytes": sum(len(d.text.encode()) for d in split_docs),
            "tokens": tokens,
        }
    stats["tokenizer_vocab"] = len(tokenizer)
    stats["build_seconds"] = round(time.perf_counter() - start, 1)
    meta = {"fingerprint": _fingerprint(cfg), "stats": stats}
    (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(directory)
    except OSError:  # another machine built it first (shared disk): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(cfg: DataSection, texts: list[str]) -> Any:
    if cfg.tokenizer:
        from parallm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        from parallm.data.bpe import train_bpe

        tokenizer = train_bpe(texts, cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"data.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer ({len(tokenizer)})"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"data.tokenizer {cfg.tokenizer!r} has no EOS token to end documents")
    return tokenizer


def _encode(tokenizer: Any, texts: list[str], batch: int = 256) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id
    for i in range(0, len(texts), batch):
        for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]:
            yield [*ids, eos]


class SampleSource(Protocol):
    """Sequences of ``seq_len + 1`` tokens by global sample index."""

    def __len__(self) -> int: ...

    def sample(self, index: int) -> np.ndarray: ...


class ShuffledWindows:
    """Non-overlapping windows of a token stream; sample ``i`` is a window of epoch ``i // N``."""

    def __init__(self, tokens: TokenShards, seq_len: int, seed: int, shuffle: bool = True) -> None:
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"data.seq_len ({seq_len}) is longer than the token stream ({len(tokens)} tokens)"
            )
        self._epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return self.num_windows

    def sample(self, index: int) -> np.ndarray:
        epoch, offset = divmod(index, self.num_windows)
        window = self._order_for(epoch)[offset] if self.shuffle else offset
        start = int(window) * self.seq_len
        return self.tokens.read(start, start + self.seq_len + 1)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return self._order


class RandomTokens:
    """Uniform random tokens, a pure function of (seed, index): data for benchmarks and tests."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, length: int = 1 << 40) -> None:
        self.vocab_size, self.seq_len, self.seed, self.length = vocab_size, seq_len, seed, length

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)


def sample_sources(cfg: DataSection, dataset: Dataset) -> tuple[SampleSource, SampleSource]:
    """The training source (shuffled) and the validation source (in order)."""
    if dataset.directory is None:
        return (
            RandomTokens(cfg.vocab_size, cfg.seq_len, cfg.seed),
            RandomTokens(cfg.vocab_size, cfg.seq_len, cfg.seed + 1),
        )
    train = ShuffledWindows(TokenShards(dataset.directory, "train"), cfg.seq_len, cfg.seed)
    val_tokens = TokenShards(dataset.directory, "val")
    if len(val_tokens) <= cfg.seq_len:
        # No held-out documents (val_fraction = 0, or a tiny corpus): validate on training data.
        return train, ShuffledWindows(train.tokens, cfg.seq_len, cfg.seed, shuffle=False)
    return train, ShuffledWindows(val_tokens, cfg.seq_len, cfg.seed, shuffle=False)


def _to_tensor(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


class DataLoader:
    """This rank's micro-batches of each global batch, in a fixed global order.

    Global batch ``k`` is samples ``[k * G, (k + 1) * G)``; data-parallel rank ``r`` of ``D``
    takes the ``r``-th contiguous ``G / D`` of them, cut into micro-batches.
    """

    def __init__(
        self,
        source: SampleSource,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        self.source = source
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.samples_seen = 0

    def next_batch(self) -> list[torch.Tensor]:
        """Micro-batches ``[micro_batch_size, seq_len + 1]`` of the next global batch."""
        per_rank = self.global_batch_size // self.dp_size
        first = self.samples_seen + self.dp_rank * per_rank
        rows = [self.source.sample(first + i) for i in range(per_rank)]
        self.samples_seen += self.global_batch_size
        mb = self.micro_batch_size
        return [_to_tensor(rows[i : i + mb]) for i in range(0, per_rank, mb)]

    def skip_batch(self) -> None:
        """Move past the next global batch without reading it."""
        self.samples_seen += self.global_batch_size

    def state_dict(self) -> dict[str, int]:
        # Independent of the rank layout: only global counts are stored.
        return {"samples_seen": self.samples_seen, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_seen = int(state["samples_seen"])


def eval_batches(
    source: SampleSource, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, weight) micro-batches of the first ``num_samples`` validation sequences.

    Every rank yields the same number of batches (collectives need it); rows that only pad a
    rank's share have weight 0.
    """
    num_samples = min(num_samples, len(source))
    mine = list(range(dp_rank, num_samples, dp_size))
    per_rank = -(-num_samples // dp_size)
    mine += [-1] * (per_rank - len(mine))
    for i in range(0, per_rank, micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        rows = [source.sample(max(j, 0)) for j in chunk]
        weight = torch.tensor([float(j >= 0) for j in chunk])
        yield _to_tensor(rows), weight
