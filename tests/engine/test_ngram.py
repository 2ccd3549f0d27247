"""Prompt lookup (the ``ngram`` drafter): which earlier occurrence it copies from (the latest),
and how much (a match near the end repeats as a run)."""

from __future__ import annotations

import array
import random

import numpy as np
import pytest

from parallm.engine.spec.ngram import propose_ngram


def reference_propose(
    tokens: list[int], num_tokens: int, min_n: int, max_n: int, latest: bool = True
) -> list[int]:
    """The definition, spelled out: longest n first, then the latest occurrence (the earliest
    with ``latest=False``: vLLM's policy, to show where the two differ), and what followed it
    as if the sequence went on repeating it: ``num_tokens`` of them."""
    size = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n >= size:
            continue
        suffix = tokens[size - n :]
        # Starts whose n-gram ends before the last token, in the order the policy prefers.
        starts = range(size - n - 1, -1, -1) if latest else range(size - n)
        for start in starts:
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n :]
                return [follow[i % len(follow)] for i in range(num_tokens)]
    return []


def test_the_latest_of_several_occurrences_is_copied():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2]
    # "1 2" occurs at 0 and 3 before the end; the latest (3) was followed by 4, 1, 2.
    assert propose_ngram(tokens, 3, 2, 2) == [4, 1, 2]
    assert reference_propose(tokens, 3, 2, 2, latest=False) == [3, 1, 2]  # vLLM's
    tokens = [7, 8, 1, 9, 2, 9, 3, 9]
    # 9 occurs at 3 and 5 before the end; the latest (5) was followed by 3, 9 only, a run
    # "3 9" that repeats.
    assert propose_ngram(tokens, 2, 1, 1) == [3, 9]
    assert propose_ngram(tokens, 5, 1, 1) == [3, 9, 3, 9, 3]


def test_the_longest_matching_n_wins_over_a_later_shorter_match():
    # The suffix (4, 5) occurred at 0..1 (followed by 6, 0, 9); 5 alone occurred later, at 5.
    tokens = [4, 5, 6, 0, 9, 5, 7, 4, 5]
    assert propose_ngram(tokens, 3, 1, 2) == [6, 0, 9]
    assert propose_ngram(tokens, 3, 1, 3) == [6, 0, 9]
    # max_n caps the length compared: with max_n = 1 the latest single-token match wins.
    assert propose_ngram(tokens, 3, 1, 1) == [7, 4, 5]
    # A longer n that recurs only earlier than a shorter one's latest match still wins.
    tokens = [1, 2, 3, 8, 9, 2, 3, 7, 1, 2, 3]
    assert propose_ngram(tokens, 2, 2, 3) == [8, 9]
    assert propose_ngram(tokens, 2, 2, 2) == [7, 1]


def test_min_n_refuses_shorter_matches():
    tokens = [1, 2, 3, 9, 2, 3]
    assert propose_ngram(tokens, 4, 2, 4) == [9, 2, 3, 9]
    assert propose_ngram(tokens, 4, 3, 4) == []


def test_a_match_near_the_end_repeats_as_a_run():
    """Where the sequence ends before ``num_tokens`` followed the match, the tokens after it
    repeat: the match's n-gram ends the sequence too, so the text is a run of that period."""
    tokens = [1, 2, 3, 4, 1, 2]
    assert propose_ngram(tokens, 10, 2, 2) == [3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    assert propose_ngram(tokens, 3, 2, 2) == [3, 4, 1]  # enough followed: no repeat
    # A run of one token: the latest "5 5" before the last token leaves one token after it.
    assert propose_ngram([5, 5, 5, 5], 4, 2, 2) == [5, 5, 5, 5]
    assert propose_ngram([7, 8, 9] * 3, 8, 1, 3) == [7, 8, 9, 7, 8, 9, 7, 8]


def test_no_match_gives_nothing():
    assert propose_ngram([1, 2, 3, 4, 5], 3, 1, 3) == []
    assert propose_ngram([], 3, 1, 3) == []
    assert propose_ngram([4], 3, 1, 3) == []
    assert propose_ngram([1, 2, 1], 0, 1, 3) == []


def test_n_larger_than_the_sequence_falls_back_to_what_fits():
    assert propose_ngram([6, 6], 3, 1, 10) == [6, 6, 6]
    assert propose_ngram([1, 2, 1, 2], 3, 2, 50) == [1, 2, 1]
    assert propose_ngram([1, 2, 1, 2], 3, 5, 50) == []


@pytest.mark.parametrize(
    "as_buffer",
    [list, lambda t: np.asarray(t, dtype=np.int64), lambda t: array.array("i", t)],
    ids=["list", "ndarray", "array"],
)
def test_integer_buffers_give_the_list_answer(as_buffer):
    tokens = [9, 1, 2, 3, 9, 1, 2, 7, 1, 2]
    got = propose_ngram(as_buffer(tokens), 3, 1, 3)
    assert got == [7, 1, 2] == reference_propose(tokens, 3, 1, 3)
    assert all(type(t) is int for t in got)


def test_matches_the_reference_on_random_sequences():
    rng = random.Random(1234)
    proposed = differs = 0
    for _ in range(3000):
        vocab = rng.choice([2, 3, 5, 20, 1000])
        size = rng.randrange(0, 80)
        tokens = [rng.randrange(vocab) for _ in range(size)]
        if size > 8 and rng.random() < 0.3:  # plant a repeat so long matches occur
            start = rng.randrange(size - 8)
            tokens += tokens[start : start + rng.randrange(1, 9)]
        min_n = rng.randrange(1, 5)
        max_n = rng.randrange(min_n, 9)
        num_tokens = rng.randrange(1, 8)
        expected = reference_propose(tokens, num_tokens, min_n, max_n)
        assert propose_ngram(tokens, num_tokens, min_n, max_n) == expected, (
            tokens, num_tokens, min_n, max_n,
        )  # fmt: skip
        proposed += bool(expected)
        differs += expected != reference_propose(tokens, num_tokens, min_n, max_n, latest=False)
    assert proposed > 1000  # the comparison covered many matches, not only empty proposals
    assert differs > 300  # and many where the earliest occurrence would have drafted otherwise


def test_a_byte_match_across_two_tokens_is_no_occurrence():
    # On a little-endian host the words of 256 then 0 hold those of token 1 one byte in: a
    # byte match that straddles two tokens, not an earlier 1.
    assert (
        propose_ngram([256, 0, 7, 1], 2, 1, 1) == reference_propose([256, 0, 7, 1], 2, 1, 1) == []
    )
    assert propose_ngram([256, 0, 1, 5, 1], 2, 1, 1) == [5, 1]
    # Searching back from the end, straddling matches come first and are passed over: 1 0
    # lies inside 256 0 0, and the latest aligned "1 0" is the one at 0.
    tokens = [1, 0, 5, 256, 0, 0, 7, 256, 0, 0, 1, 0]
    assert propose_ngram(tokens, 2, 2, 2) == [5, 256] == reference_propose(tokens, 2, 2, 2)
    # A straddling match one byte into an aligned one: token 0's last 3 bytes and 256's first
    # hold the word of 0; the aligned 0 just before it is the latest occurrence.
    assert propose_ngram([5, 0, 256, 9, 0], 2, 1, 1) == [256, 9]
