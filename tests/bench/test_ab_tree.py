"""scripts/ab_tree.sh: a revision's files under .ab/NAME with its commit, the bundled weights
a link to the checkout's copy only where the bytes are the same, and bad arguments refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/ab_tree.sh"
WEIGHTS = "parallm/assets/code-model/model.safetensors"


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def _repo(tmp_path: Path, weights: bytes) -> Path:
    repo = tmp_path / "repo"
    (repo / WEIGHTS).parent.mkdir(parents=True)
    (repo / WEIGHTS).write_bytes(weights)
    (repo / "parallm/__init__.py").write_text("VERSION = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "one")
    return repo


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=repo, capture_output=True, text=True)


def test_tree_links_identical_weights_and_records_its_commit(tmp_path):
    repo = _repo(tmp_path, b"weights")
    first = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "parallm/__init__.py").write_text("VERSION = 2\n")
    _git(repo, "commit", "-qam", "two")
    proc = _run(repo, "old", first)
    assert proc.returncode == 0, proc.stderr
    tree = repo / ".ab/old"
    assert (tree / ".commit").read_text().strip() == first
    assert (tree / "parallm/__init__.py").read_text() == "VERSION = 1\n"  # the revision's file
    assert (tree / WEIGHTS).is_symlink() and (tree / WEIGHTS).read_bytes() == b"weights"


def test_different_weights_stay_a_copy(tmp_path):
    repo = _repo(tmp_path, b"old weights")
    first = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / WEIGHTS).write_bytes(b"new weights")
    _git(repo, "commit", "-qam", "retrained")
    assert _run(repo, "old", first).returncode == 0
    copy = repo / ".ab/old" / WEIGHTS
    assert not copy.is_symlink() and copy.read_bytes() == b"old weights"


def test_bad_arguments_are_refused(tmp_path):
    repo = _repo(tmp_path, b"w")
    assert "usage" in _run(repo, "only-one").stderr
    assert "NAME must be" in _run(repo, "../escape", "HEAD").stderr
    assert _run(repo, "x", "no-such-rev").returncode != 0
    assert not (repo / ".ab/x").exists()
