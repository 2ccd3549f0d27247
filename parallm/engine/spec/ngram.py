"""Prompt lookup: draft the tokens that followed the earliest occurrence of the sequence's own
last n tokens (vLLM's ``ngram`` method; no model runs). The earliest occurrence, as vLLM
takes: in a repeating run shorter than the draft length it still proposes a full draft.

It runs on the host for every running sequence every step, so the search is vectorised: one
pass finds the earlier positions holding the last token, and each further compare only looks at
the positions whose match is still growing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose_ngram(
    token_ids: Sequence[int] | np.ndarray, num_tokens: int, min_n: int, max_n: int
) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the longest suffix n-gram seen before.

    ``token_ids`` is the whole sequence (prompt and output so far); a list, or an integer
    ``numpy`` or ``array.array`` buffer, which is read without a copy. The longest n in
    ``[min_n, max_n]`` whose last-n-token suffix also occurs earlier wins; among its earlier
    occurrences, the earliest. The proposal is what followed that occurrence, cut short where the
    sequence ends; ``[]`` when no n-gram of at least ``min_n`` tokens recurs.
    """
    size = len(token_ids)
    # An occurrence must end before the last token, so at most size - 1 tokens can match.
    longest = min(max_n, size - 1)
    if num_tokens < 1 or min_n < 1 or longest < min_n:
        return []
    tokens = _as_array(token_ids)
    # Invariant: `ends` holds, in increasing order, every earlier end position e (e < size - 1)
    # with tokens[e - j] == tokens[size - 1 - j] for all j < matched.
    ends = np.flatnonzero(tokens[: size - 1] == tokens[size - 1])
    matched = 1
    while ends.size and matched < longest:
        ends_long_enough = ends[np.searchsorted(ends, matched) :]
        grown = ends_long_enough[tokens[ends_long_enough - matched] == tokens[size - 1 - matched]]
        if not grown.size:
            break
        ends, matched = grown, matched + 1
    if not ends.size or matched < min_n:
        return []
    start = int(ends[0]) + 1
    return tokens[start : start + num_tokens].tolist()


def _as_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(token_ids, list):
        # fromiter skips asarray's type inference over the elements.
        return np.fromiter(token_ids, dtype=np.int64, count=len(token_ids))
    return np.asarray(token_ids)
