"""spec/suffix_index.py: the newest occurrence that a token follows, n going up, against a
brute-force scan, on random arrays with separators, small and across many blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from parallm.engine.spec.suffix_index import SuffixIndex

SEP = -1


def brute_end(tokens: list[int], context: list[int], n: int) -> int:
    """The highest end e of the context's last n tokens in ``tokens`` with a token (not a
    separator, not past the end) at e + 1."""
    pattern = context[len(context) - n :]
    for end in range(len(tokens) - 2, n - 2, -1):
        if tokens[end - n + 1 : end + 1] == pattern and tokens[end + 1] != SEP:
            return end
    return -1


@pytest.mark.parametrize("seed", range(12))
def test_every_n_matches_a_scan(seed):
    rng = random.Random(seed)
    size = rng.choice([1, 2, 7, 300, 2000])  # 2,000: whole blocks and a sparse table
    alphabet = [0, 1, 2, SEP] if seed % 2 else [0, 1, 2, 3, 4, 5, SEP]
    tokens = [rng.choice(alphabet) for _ in range(size)]
    depth = rng.choice([1, 3, 8])
    index = SuffixIndex(np.array(tokens, dtype=np.int32), depth, SEP)
    for _ in range(30):
        context = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        walk = index.walk(context)
        for n in range(1, min(depth, len(context)) + 1):
            assert walk.end(n) == brute_end(tokens, context, n), (context, n)


def test_a_repeated_run_takes_the_newest_occurrence_followed_by_a_token():
    tokens = [5, 6, 7, SEP, 5, 6, 8, 5, 6]  # the last "5 6" ends the array: nothing follows
    index = SuffixIndex(np.array(tokens, dtype=np.int32), 4, SEP)
    walk = index.walk([9, 5, 6])
    assert [walk.end(n) for n in (1, 2, 3)] == [5, 5, -1]
    assert index.walk([7]).end(1) == -1  # followed by a separator
    with pytest.raises(ValueError, match="n must go up"):
        walk.end(2)
    with pytest.raises(ValueError, match="at most 4"):
        index.walk([5, 6, 5, 6, 5]).end(5)
