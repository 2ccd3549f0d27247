"""Text corpora for training: Python's standard library or a directory of files, in a fixed order.

The order and the train/validation split depend only on relative file paths, so the same
Python version (or the same directory) always gives the same corpus, on any machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Folders that hold tests or installed third-party packages, never library code.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Generated at build time (paths, compiler flags): differs between machines.
_SKIPPED_FILE_PREFIXES = ("_sysconfigdata",)


@dataclass(frozen=True)
class Document:
    """One source file: its path relative to the corpus root, and its text."""

    name: str
    text: str


def stdlib_root() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path, extensions: tuple[str, ...] = (".py",)) -> list[Path]:
    """Files under ``root`` with one of ``extensions``, sorted, skipping test folders."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if not path.is_file() or path.suffix not in extensions:
            continue
        if _skipped(rel):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _skipped(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    if any(d in _SKIPPED_DIRS or d.startswith("config-") for d in dirs):
        return True
    return rel.name.startswith(_SKIPPED_FILE_PREFIXES)


def read_corpus(
    corpus: str, extensions: tuple[str, ...] = (".py",), max_files: int = 0
) -> Iterator[Document]:
    """Documents of ``corpus`` ("stdlib" or a directory), in order; undecodable bytes replaced."""
    root = stdlib_root() if corpus == "stdlib" else Path(corpus)
    if not root.is_dir():
        raise ValueError(f"data.corpus: {corpus!r} is neither 'stdlib' nor a directory")
    files = corpus_files(root, extensions)
    if max_files > 0:
        files = files[:max_files]
    if not files:
        raise ValueError(f"data.corpus: no {list(extensions)} files under {root}")
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        yield Document(path.relative_to(root).as_posix(), text)


def is_held_out(name: str, fraction: float) -> bool:
    """Whether a document goes to validation: a hash of its name, so the split never shifts."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
