"""Corpus, token shards and the deterministic, layout-independent data loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parallm.data.corpus import corpus_files, is_held_out, read_corpus, stdlib_root
from parallm.data.shards import TokenShards, write_shards
from parallm.train.data import DataLoader, RandomTokens, ShuffledWindows, eval_batches


def test_stdlib_corpus_skips_tests_and_is_sorted() -> None:
    files = corpus_files(stdlib_root())
    names = [f.relative_to(stdlib_root()).as_posix() for f in files]
    assert names == sorted(names)
    assert "os.py" in names and "json/decoder.py" in names
    assert not [n for n in names if "/test/" in f"/{n}" or "/tests/" in f"/{n}"]
    assert not [n for n in names if "site-packages" in n or "idle_test" in n]


def test_corpus_directory_and_split(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "b.py").write_text("b = 2\n")
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "tests" / "test_a.py").write_text("assert a\n")
    (tmp_path / "notes.txt").write_text("skip me\n")
    docs = list(read_corpus(str(tmp_path)))
    assert [d.name for d in docs] == ["b.py", "pkg/a.py"]
    held = [is_held_out(f"file{i}.py", 0.25) for i in range(2000)]
    assert 0.2 < sum(held) / len(held) < 0.3
    assert held == [is_held_out(f"file{i}.py", 0.25) for i in range(2000)]


def test_shards_read_across_boundaries(tmp_path: Path) -> None:
    tokens = list(range(1000))
    chunks = [tokens[i : i + 37] for i in range(0, 1000, 37)]
    total = write_shards(chunks, tmp_path, "train", shard_tokens=128, dtype=np.dtype(np.uint16))
    assert total == 1000 and len(list(tmp_path.glob("train_*.npy"))) == 8
    shards = TokenShards(tmp_path, "train")
    assert len(shards) == 1000
    assert shards.read(120, 300).tolist() == tokens[120:300]
    assert shards.read(999, 1000).tolist() == [999]


def _windows(tmp_path: Path) -> ShuffledWindows:
    write_shards([list(range(2000))], tmp_path, "train", 300, np.dtype(np.uint16))
    return ShuffledWindows(TokenShards(tmp_path, "train"), seq_len=16, seed=7)


def test_windows_cover_each_epoch_once(tmp_path: Path) -> None:
    windows = _windows(tmp_path)
    n = len(windows)
    starts = [int(windows.sample(i)[0]) for i in range(n)]
    assert sorted(starts) == [16 * i for i in range(n)]
    assert starts != sorted(starts)  # shuffled
    second_epoch = [int(windows.sample(n + i)[0]) for i in range(n)]
    assert sorted(second_epoch) == sorted(starts) and second_epoch != starts
    assert windows.sample(3).tolist() == list(range(starts[3], starts[3] + 17))


def _global_batches(source, dp_size: int, steps: int, resume_at: int = 0) -> list[torch.Tensor]:
    """Each step's global batch, concatenated over ranks in rank order."""
    loaders = [DataLoader(source, 8, 2, rank, dp_size) for rank in range(dp_size)]
    for loader in loaders:
        loader.load_state_dict({"samples_seen": resume_at * 8})
    batches = []
    for _ in range(steps):
        batches.append(torch.cat([torch.cat(loader.next_batch()) for loader in loaders]))
    return batches


@pytest.mark.parametrize("kind", ["windows", "random"])
def test_loader_is_layout_independent_and_resumable(tmp_path: Path, kind: str) -> None:
    source = _windows(tmp_path) if kind == "windows" else RandomTokens(100, 16, seed=1)
    one_rank = _global_batches(source, dp_size=1, steps=6)
    for dp_size in (2, 4):
        batches = _global_batches(source, dp_size, 6)
        assert all(torch.equal(a, b) for a, b in zip(one_rank, batches, strict=True))
    # Saved after step 4 on 2 ranks, resumed on 1 rank: the next batch is step 5's.
    loader = DataLoader(source, 8, 2, 0, 2)
    for _ in range(4):
        loader.next_batch()
    resumed = _global_batches(
        source, 1, steps=2, resume_at=loader.state_dict()["samples_seen"] // 8
    )
    assert torch.equal(resumed[0], one_rank[4]) and torch.equal(resumed[1], one_rank[5])


def test_eval_batches_balance_ranks() -> None:
    source = RandomTokens(100, 8, seed=3)
    per_rank = [list(eval_batches(source, 5, 2, rank, 2)) for rank in range(2)]
    assert [len(b) for b in per_rank] == [2, 2]  # equal counts: collectives stay matched
    weights = torch.cat([w for batches in per_rank for _, w in batches])
    assert weights.sum() == 5


def test_python_corpus_is_stdlib_plus_packages(tmp_path: Path, monkeypatch) -> None:
    from parallm.data import corpus as corpus_mod

    pkgs = tmp_path / "site-packages"
    (pkgs / "lib" / "tests").mkdir(parents=True)
    (pkgs / "lib" / "core.py").write_text("x = 1\n")
    (pkgs / "lib" / "tests" / "test_core.py").write_text("assert x\n")
    monkeypatch.setattr(corpus_mod, "package_roots", lambda: [pkgs])
    names = [d.name for d in read_corpus("python")]
    assert "stdlib/os.py" in names and "site-packages/lib/core.py" in names
    assert not [n for n in names if "/tests/" in n]
    assert names.index("stdlib/os.py") < names.index("site-packages/lib/core.py")
    # The digest follows the installed files, so a dataset built from other packages is stale.
    before = corpus_mod.corpus_digest("python")
    (pkgs / "lib" / "extra.py").write_text("y = 2\n")
    assert corpus_mod.corpus_digest("python") != before


def test_unknown_corpus_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'stdlib', 'python', 'synthetic'"):
        list(read_corpus("/no/such/dir"))
