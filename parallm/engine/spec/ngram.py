"""Prompt lookup: draft the tokens that followed the earliest occurrence of the sequence's own
last n tokens (vLLM's ``ngram`` method; no model runs). The earliest occurrence, as vLLM
takes: in a repeating run shorter than the draft length it still proposes a full draft.

It runs on the host for every running sequence every step, so the search is a substring search
in C: the tokens as 4-byte words, searched with ``bytes.find`` for each n, longest first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_WORD = 4  # bytes per token id in the searched buffer (int32: every vocabulary fits)


def propose_ngram(
    token_ids: Sequence[int] | np.ndarray, num_tokens: int, min_n: int, max_n: int
) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the longest suffix n-gram seen before.

    ``token_ids`` is the whole sequence (prompt and output so far); a list, or an integer
    ``numpy`` or ``array.array`` buffer. The longest n in ``[min_n, max_n]`` whose last-n-token
    suffix also occurs earlier wins; among its earlier occurrences, the earliest. The proposal
    is what followed that occurrence, cut short where the sequence ends; ``[]`` when no n-gram
    of at least ``min_n`` tokens recurs.
    """
    size = len(token_ids)
    # An occurrence must end before the last token, so at most size - 1 tokens can match.
    longest = min(max_n, size - 1)
    if num_tokens < 1 or min_n < 1 or longest < min_n:
        return []
    words = _as_words(token_ids)
    limit = (size - 1) * _WORD  # an occurrence lies wholly before the last token
    for n in range(longest, min_n - 1, -1):
        at = _find_word_aligned(words, words[(size - n) * _WORD :], limit)
        if at >= 0:
            start = at + n
            end = min(start + num_tokens, size)
            proposal = token_ids[start:end]
            return proposal if isinstance(proposal, list) else np.asarray(proposal).tolist()
    return []


def _find_word_aligned(words: bytes, pattern: bytes, limit: int) -> int:
    """The token index of the first occurrence of ``pattern`` in ``words[:limit]`` that starts
    on a token boundary, or -1 (a byte match may straddle two tokens)."""
    at = words.find(pattern, 0, limit)
    while at >= 0 and at % _WORD:
        at = words.find(pattern, at + 1, limit)
    return at // _WORD if at >= 0 else -1


def _as_words(token_ids: Sequence[int] | np.ndarray) -> bytes:
    if isinstance(token_ids, list):
        # fromiter skips asarray's type inference over the elements.
        return np.fromiter(token_ids, dtype=np.int32, count=len(token_ids)).tobytes()
    return np.asarray(token_ids, dtype=np.int32).tobytes()
