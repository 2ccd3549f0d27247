"""benchmarks/ngram_acceptance.py: its earliest- and latest-occurrence lookups against their
brute-force definitions, its replay of a greedy run's steps against a hand-worked example
(drafting from earlier requests through the engine's ``TokenHistory``), its draft trees of
several chains (the candidates against their definitions, the longest match kept), and a whole
run with the bundled model on CPU."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from benchmark_module import load_benchmark

from parallm.bundled import BUNDLED_MODEL_DIR
from parallm.train.config import DataSection
from parallm.train.data import prepare_dataset

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks/ngram_acceptance.py"


def _bench():
    return load_benchmark("ngram_acceptance")


def _by_definition(tokens, num_tokens, min_n, max_n, latest):
    """Longest n first; the first or the last start whose n-gram ends before the last token;
    the earliest's drafts cut short where the sequence ends (vLLM's), the latest's repeating
    what followed (the engine's)."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        starts = [s for s in range(size - n) if tokens[s : s + n] == tokens[size - n :]]
        if starts:
            start = starts[-1] if latest else starts[0]
            follow = tokens[start + n :]
            if latest:
                return [follow[i % len(follow)] for i in range(num_tokens)]
            return follow[:num_tokens]
    return []


@pytest.mark.parametrize("occurrence", ["earliest", "latest"])
def test_each_lookup_matches_its_definition(occurrence):
    """Both policies the bench compares, each against its brute-force definition; the latest
    is the engine's ``propose_ngram``."""
    bench = _bench()
    rng = random.Random(0)
    for _ in range(400):
        # Large token ids too: a byte match that straddles two tokens must not count.
        alphabet = [rng.randrange(1, 4) * 256 ** rng.randrange(0, 3) for _ in range(3)]
        tokens = [rng.choice(alphabet) for _ in range(rng.randrange(1, 30))]
        k, lo = rng.randrange(1, 6), rng.randrange(1, 3)
        hi = lo + rng.randrange(0, 3)
        want = _by_definition(tokens, k, lo, hi, occurrence == "latest")
        assert bench.draft(tokens, k, lo, hi, occurrence) == want


def test_latest_and_earliest_differ_where_a_suffix_recurs():
    bench = _bench()
    tokens = [5, 9, 1, 2, 5, 9, 3, 4, 5, 9]
    assert bench.draft(tokens, 2, 2, 2, "earliest") == [1, 2]
    assert bench.draft(tokens, 2, 2, 2, "latest") == [3, 4]


def test_the_latest_occurrence_repeats_a_run_that_the_earliest_cuts():
    bench = _bench()
    # "4 6" occurs once before the last token, two tokens back: only "4 6" follows it, which
    # vLLM's lookup cuts there; the engine's lookup repeats the run.
    tokens = [1, 4, 6, 4, 6]
    assert bench.draft(tokens, 3, 2, 2, "earliest") == [4, 6]
    assert bench.draft(tokens, 3, 2, 2, "latest") == [4, 6, 4]


def test_walk_counts_the_steps_of_a_greedy_run():
    bench = _bench()
    variant = {"k": 3, "min_n": 1, "max_n": 1, "occurrence": "earliest"}
    prompt = [1, 2, 3, 4]
    output = [1, 2, 3, 9, 9]
    # The prefill emits 1. Context ..4 1: "1" occurred at 0, drafts 2 3 4, of which 2 3 are
    # kept and the verify step emits 9. Context ..3 9: no earlier 9, no drafts, 9 emitted.
    # Three steps, one of them drafted, two drafts accepted.
    assert bench.walk(prompt, output, variant) == (3, 1, 2, 3)  # 3 draft nodes


def test_history_drafts_only_where_the_request_gives_nothing():
    bench = _bench()
    variant = {"k": 2, "min_n": 1, "max_n": 3, "occurrence": "latest"}
    history = bench.TokenHistory(64)
    history.add([1, 2, 3, 4, 5, 6])
    prompt, output = [7, 2, 3], [4, 5, 9]
    # The prefill emits 4. Context 7 2 3 4: no earlier 4 nor "3 4" in the request; the
    # history's latest "2 3 4" gives 5 6, of which 5 is kept and 9 emitted: two steps.
    assert bench.walk(prompt, output, variant, history) == (2, 1, 1, 2)
    assert bench.walk(prompt, output, variant) == (3, 0, 0, 0)  # 5, then 9, one a step
    # The request's own drafts come first: "3 8" recurs in it, so 3 8 is drafted (and
    # rejected) though the history has nothing to say.
    assert bench.walk([3, 8, 3], [8, 0], variant, history) == (2, 1, 0, 2)


def test_history_lookup_takes_the_latest_occurrence_and_stops_at_a_request_end():
    history = _bench().TokenHistory(64)
    history.add([5, 6, 1])
    history.add([5, 6, 2, 3])
    history.add([9, 5, 6])  # ends right after "5 6": nothing follows there
    assert history.lookup([0, 5, 6], 3, 2, 8) == [2, 3]  # the latest with a continuation
    assert history.lookup([0, 5, 6], 1, 2, 8) == [2]
    assert history.lookup([9, 5, 6], 3, 2, 8) == [2, 3]  # the longest n first: "9 5 6" ends
    assert history.lookup([7, 7], 3, 2, 8) == []
    # A byte match straddling tokens: "1 0" is 01 00 00 00 00 00 00 00, which 256 0 0
    # (00 01 00 00 | 00 00 00 00 | 00 00 00 00) holds one byte in.
    straddle = _bench().TokenHistory(64)
    straddle.add([256, 0, 0, 5])
    assert straddle.lookup([1, 0], 1, 2, 2) == []
    straddle.add([1, 0, 4])
    assert straddle.lookup([1, 0], 1, 2, 2) == [4]


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model")
def test_whole_run_scores_every_variant(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    body = "def f{i}(x):\n    return x + {i}\n\n"
    for j in range(3):
        text = "import os\n\n\n" + "".join(body.format(i=i) for i in range(8)) + "def g(y):\n"
        (corpus / f"m{j}.py").write_text(text)
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH), "--corpus", str(corpus), "--val-fraction", "1",
           "--num-prompts", "3", "--max-tokens", "12", "--device", "cpu", "--dtype", "float32",
           "--k", "2,4", "--min-n", "1,2", "--max-n", "2", "--branches", "1,3",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    chains = [r for r in rows if r["branches"] == 1]
    assert len(chains) == 2 * 2 * 2 * 2  # k x min_n x occurrence x history
    trees = [r for r in rows if r["branches"] == 3]
    assert len(trees) == 2 * 2  # k x min_n, the ring's latest variants
    lookups = [r for r in rows if r["tree_sources"] == "lookups"]
    assert len(lookups) == 2 * 2 and {r["branches"] for r in lookups} == {2}
    tokens = {r["tokens"] for r in rows}
    assert len(tokens) == 1  # every variant replays the same plain outputs
    for r in rows:
        assert 1 <= r["tokens_per_step"] <= r["k"] + 1
        assert 0 <= r["drafted_share"] <= 1
        assert r["drafted_share"] == 0 or 1 <= r["tokens_per_drafted_step"] <= r["k"] + 1
        assert 0 <= r["nodes_per_step"] <= r["branches"] * r["k"]


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model")
def test_a_datastore_adds_variants_that_never_emit_fewer_tokens_a_step(tmp_path):
    """With ``--datastore`` every ring variant gains a twin that also drafts from the
    datastore, only where the request and the ring give nothing: a draft there can only add
    accepted tokens, so the twin's tokens a step are never fewer."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for j in range(3):  # a def after line 5, cut there for the prompt, with more after it
        body = "".join(f"def f{i}(x):\n    return x * {i + j}\n\n" for i in range(4))
        tail = "    if y is None:\n        return sys.argv\n    return [y, sys.path]\n"
        (corpus / f"m{j}.py").write_text(f"import sys\n\n\n{body}def g(y):\n{tail}")
    data = DataSection(corpus=str(corpus), dataset_dir=str(tmp_path / "data"),
                       tokenizer=str(BUNDLED_MODEL_DIR), val_fraction=0.0)  # fmt: skip
    prepare_dataset(data)
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(BENCH), "--corpus", str(corpus), "--val-fraction", "1",
           "--num-prompts", "3", "--max-tokens", "12", "--device", "cpu", "--dtype", "float32",
           "--k", "4", "--min-n", "2", "--max-n", "3", "--datastore", data.dataset_dir,
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a datastore of" in proc.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 3  # occurrence x (none, ring, ring + datastore)
    key = lambda r: r["occurrence"]  # noqa: E731
    ring = {key(r): r for r in rows if r["history"] and not r["datastore"]}
    store = [r for r in rows if r["datastore"]]
    assert len(store) == 2
    for r in store:
        assert r["tokens_per_step"] >= ring[key(r)]["tokens_per_step"]
        assert r["drafted_share"] >= ring[key(r)]["drafted_share"]


def test_score_drafts_from_the_datastore_after_the_ring():
    bench = _bench()
    variant = {"k": 2, "min_n": 1, "max_n": 3, "occurrence": "latest",
               "history": True}  # fmt: skip
    store = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
    # As in test_history_drafts_only_where_the_request_gives_nothing, with the datastore in
    # the ring's place: "2 3 4" gives 5 6, 5 kept, 9 emitted.
    with_store = bench.score([[7, 2, 3]], [[4, 5, 9]], {**variant, "datastore": True}, store)
    ring_only = bench.score([[7, 2, 3]], [[4, 5, 9]], {**variant, "datastore": False}, store)
    assert (with_store["steps"], with_store["tokens_per_step"]) == (2, 1.5)
    assert (ring_only["steps"], ring_only["drafted_share"]) == (3, 0.0)


def test_own_continuations_match_their_definition():
    """Distinct continuations, longest n first, newest occurrence first within an n."""
    bench = _bench()
    rng = random.Random(1)
    for _ in range(300):
        tokens = [rng.randrange(1, 4) for _ in range(rng.randrange(1, 30))]
        k, lo = rng.randrange(1, 5), rng.randrange(1, 3)
        hi, limit = lo + rng.randrange(0, 3), rng.randrange(1, 5)
        want, size = [], len(tokens)
        for n in range(min(hi, size - 1), lo - 1, -1):
            for s in reversed(range(size - n)):
                chain = tokens[s + n : s + n + k]
                if tokens[s : s + n] == tokens[size - n :] and chain not in want:
                    want.append(chain)
        assert bench.own_continuations(tokens, k, lo, hi, limit) == want[:limit]


def test_majority_paths_follow_the_most_frequent_continuations():
    bench = _bench()
    sep = bench.SEPARATOR
    # After "7 8": 1 2 3 twice, 1 2 4 once, 5 6 once; "1 2 5" is cut by a separator to "1 2".
    docs = [[7, 8, 1, 2, 3], [7, 8, 1, 2, 3], [7, 8, 1, 2, 4], [7, 8, 5, 6], [7, 8, 1, 2]]
    base = np.array([t for d in docs for t in (*d, sep)][:-1], dtype=np.int32)
    index = bench.SuffixIndex(base, 8, sep)
    assert bench.majority_paths(index, [0, 7, 8], 3, 2) == [[1, 2, 3], [5, 6]]
    assert bench.majority_paths(index, [0, 7, 8], 2, 1) == [[1, 2]]
    assert bench.majority_paths(index, [9, 9], 3, 2) == []  # 9 never occurs


def test_branch_chains_order_and_tree_nodes():
    """The chain drafter's own chain, then the ring's newest, then the others; a chain that
    is a prefix of an earlier one adds nothing. The tree counts shared prefixes once."""
    bench = _bench()
    history = bench.TokenHistory(64)
    history.add([4, 5, 9, 9])
    context = [4, 5, 1, 2, 4, 5, 3, 6, 4, 5]
    variant = {"k": 2, "min_n": 2, "max_n": 2, "occurrence": "latest",
               "branches": 3}  # fmt: skip
    # Own: "4 5" last at 6 -> 3 6, before that at 0 -> 1 2; the ring: 9 9.
    assert bench.branch_chains(context, variant, history) == [[3, 6], [9, 9], [1, 2]]
    assert bench.branch_chains(context, {**variant, "branches": 2}, history) == [[3, 6], [9, 9]]
    lookups = {**variant, "tree_sources": "lookups"}  # the device drafter's two kernels' chains
    assert bench.branch_chains(context, lookups, history) == [[3, 6], [9, 9]]
    assert bench.branch_chains([1, 4, 5], lookups, history) == [[9, 9]]  # own gives none
    assert bench.tree_nodes([[3, 6], [3, 7], [3]]) == 3
    assert bench.tree_nodes([[]]) == 0


def test_walk_with_branches_keeps_the_longest_matching_chain():
    bench = _bench()
    history = bench.TokenHistory(64)
    history.add([4, 5, 9, 9])
    variant = {"k": 2, "min_n": 2, "max_n": 2, "occurrence": "latest"}
    prompt, output = [4, 5, 3, 6, 4], [5, 9, 9, 0]
    # The prefill emits 5. Own: "4 5" -> 3 6 (wrong); the ring's "4 5" -> 9 9 (right): with
    # two branches both are verified and 9 9 kept, then 0 emitted. Two steps, 4 nodes.
    assert bench.walk(prompt, output, {**variant, "branches": 2}, history) == (2, 1, 2, 4)
    # The chain drafter alone drafts 3 6 (none kept, 9 emitted), then "5 9" has nothing in the
    # request, the ring gives 9 (kept) and 0 is emitted.
    assert bench.walk(prompt, output, {**variant, "branches": 1}, history) == (3, 2, 1, 3)
