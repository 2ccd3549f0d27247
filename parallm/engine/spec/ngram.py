"""Prompt lookup (vLLM's ``ngram`` method; no model runs): draft the tokens that followed the
latest earlier occurrence of the sequence's own last n tokens. vLLM takes the earliest; the
latest drafts better, recent text being the likelier to repeat (benchmarks/ngram_acceptance.py's
``occurrence`` variant: +6% tokens a step with a minimum n of 1, docs/PERF_NOTES.md). A match
that lies near the end, closer than the draft length, is a repeating run: its drafts repeat
what followed it until there are enough (vLLM cuts them short there), as looking up again from
the sequence plus its drafts would (+4% tokens a step on the bundled model's held-out code, and
the rows a device-mode step would verify as fillers anyway: docs/PERF_NOTES.md).

It runs on the host for every running sequence every step, so the search is a substring search
in C: the tokens as 4-byte words, searched with ``bytes.rfind`` once for each n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORD_BYTES = 4  # bytes per token id in a searched buffer (int32: every vocabulary fits)


def propose_ngram(
    token_ids: Sequence[int] | np.ndarray, num_tokens: int, min_n: int, max_n: int
) -> list[int]:
    """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the longest
    suffix n-gram seen before.

    ``token_ids`` is the whole sequence (prompt and output so far); a list, or an integer
    ``numpy`` or ``array.array`` buffer. The longest n in ``[min_n, max_n]`` whose last-n-token
    suffix also occurs wholly before the last token wins (so at least one token followed it);
    among those occurrences, the latest. The proposal is what followed it; where the sequence
    ends first, those tokens repeated (a run repeating with that period) up to
    ``num_tokens``; ``[]`` when no n-gram of at least ``min_n`` tokens recurs.
    """
    size = len(token_ids)
    # An occurrence must end before the last token, so at most size - 1 tokens can match.
    longest = min(max_n, size - 1)
    if num_tokens < 1 or min_n < 1 or longest < min_n:
        return []
    words = _as_words(token_ids)
    # An occurrence of the (n + 1)-token suffix ends with one of the n-token suffix: the n that
    # recur run from min_n up to the longest, and the latest (n + 1)-gram ends no later than
    # the latest n-gram. So n goes up, each search ends where the last one's match did, and
    # only the first n that does not recur scans back to the start (going down, every longer n
    # that does not recur would).
    end = size - 1  # an occurrence lies wholly before token ``end``
    start = -1  # where the drafts start: the token after the best occurrence so far
    for n in range(min_n, longest + 1):
        at = rfind_tokens(words, words[(size - n) * WORD_BYTES :], 0, end * WORD_BYTES)
        if at < 0:
            break
        start = end = at // WORD_BYTES + n
    if start < 0:
        return []
    proposal = token_ids[start : min(start + num_tokens, size)]
    proposal = proposal if isinstance(proposal, list) else np.asarray(proposal).tolist()
    period = len(proposal)  # >= 1: the occurrence ends before the last token
    if period < num_tokens:
        proposal = [proposal[i % period] for i in range(num_tokens)]
    return proposal


def rfind_tokens(words: bytes | bytearray, pattern: bytes, start: int, end: int) -> int:
    """The byte offset of the latest occurrence of ``pattern`` (int32 tokens) lying wholly in
    ``words[start:end]`` at a token boundary, or -1: a byte match straddling two tokens is
    none (``start`` must be a token boundary)."""
    at = words.rfind(pattern, start, end)
    while at >= 0 and at % WORD_BYTES:
        # The next candidate starts at or before the token boundary below ``at``.
        at = words.rfind(pattern, start, at - at % WORD_BYTES + len(pattern))
    return at


def _as_words(token_ids: Sequence[int] | np.ndarray) -> bytes:
    if isinstance(token_ids, list):
        # fromiter skips asarray's type inference over the elements.
        return np.fromiter(token_ids, dtype=np.int32, count=len(token_ids)).tobytes()
    return np.asarray(token_ids, dtype=np.int32).tobytes()
