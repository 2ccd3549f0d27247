"""The most characters of text one token can stand for, read from a fast tokenizer's definition.

With that bound ``L``, a text of ``c`` characters encodes to at least ``ceil(c / L)`` tokens, so a
prompt longer than ``L`` times the tokens the context has room for is refused without tokenizing
it. The bound holds only when every character of the text survives into some token: the
pre-tokenizer must never drop characters, the normalizer may shrink the text only by a known
factor, and no token may stand for an unbounded run of characters (an unknown-token that
swallows a whole word). A tokenizer that cannot be shown to meet that gets no bound (``None``):
its prompts are tokenized and counted exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tokenizers import pre_tokenizers

# Normalizers that never make the text shorter (they add, map or decompose characters).
_GROWING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase"}
# Canonical composition (NFC, NFKC) turns each output character's canonical decomposition, at
# most this many characters long in Unicode, back into that one character; nothing else shrinks.
MAX_CANONICAL_DECOMPOSITION = 4
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
# Pre-tokenizers that keep every character (ByteLevel maps each UTF-8 byte to one character).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}
_BYTE_PIECES = {f"<0x{b:02X}>" for b in range(256)}
_BYTE_LEVEL_ALPHABET = set(pre_tokenizers.ByteLevel.alphabet())


def max_chars_per_token(tokenizer: Any) -> int | None:
    """``L`` as above, or None when the tokenizer gives no such bound."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # a slow (Python) tokenizer: nothing to inspect
    spec = json.loads(backend.to_str())
    shrink = _shrink_factor(spec.get("normalizer"))
    pre_tokenizer = spec.get("pre_tokenizer")
    longest_piece = _longest_piece(spec.get("model") or {}, _has_byte_level(pre_tokenizer))
    if shrink is None or longest_piece is None or not _keeps_chars(pre_tokenizer):
        return None
    added = [len(t["content"]) for t in spec.get("added_tokens") or []]
    return max([longest_piece, 1, *added]) * shrink


def _shrink_factor(normalizer: dict | None) -> int | None:
    """How many input characters at most become one normalized character (None: unbounded)."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factors = [_shrink_factor(n) for n in normalizer["normalizers"]]
        return None if None in factors else math.prod(factors)
    if kind == "Replace":
        pattern = normalizer["pattern"]
        literal = "String" in pattern and len(normalizer["content"]) >= len(pattern["String"])
        return 1 if literal else None
    if kind in _COMPOSING_NORMALIZERS:
        return MAX_CANONICAL_DECOMPOSITION
    return 1 if kind in _GROWING_NORMALIZERS else None


def _keeps_chars(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_chars(p) for p in pre_tokenizer["pretokenizers"])
    if kind in ("Split", "Punctuation"):
        return pre_tokenizer.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre_tokenizer["pretokenizers"])
    return pre_tokenizer.get("type") == "ByteLevel"


def _longest_piece(model: dict, byte_level: bool) -> int | None:
    """The longest vocabulary piece, or None when a token may stand for unboundedly many
    characters or a character may be dropped."""
    kind = model.get("type")
    if kind == "BPE":
        pieces = list(model["vocab"])
    elif kind == "Unigram":
        pieces = [piece for piece, _score in model["vocab"]]
    else:
        return None  # WordPiece and WordLevel map a whole unknown word to one token
    if not _one_token_per_unknown_char(model, set(pieces), byte_level):
        return None
    return max(map(len, pieces), default=1)


def _one_token_per_unknown_char(model: dict, vocab: set[str], byte_level: bool) -> bool:
    """A character without a piece of its own still becomes at least one token."""
    if model.get("byte_fallback") and vocab >= _BYTE_PIECES:
        return True  # its UTF-8 bytes' tokens
    if model["type"] == "Unigram":
        return False  # Unigram fuses a run of unknown characters into one token
    if model.get("unk_token") is not None:
        return not model.get("fuse_unk")  # fused: a run of them becomes one token
    # Without an unknown-token BPE drops such a character; byte-level text has none.
    return byte_level and vocab >= _BYTE_LEVEL_ALPHABET
