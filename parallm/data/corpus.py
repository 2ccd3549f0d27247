"""Text corpora for training, in a fixed order: Python's standard library ("stdlib"), the
standard library plus the installed packages ("python"), or a directory of files.

The order and the train/validation split depend only on relative file paths, so the same
Python version (or the same directory, or the same installed packages) always gives the same
corpus, on any machine.
"""

from __future__ import annotations

import hashlib
import site
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


def package_roots() -> list[Path]:
    """The directories of this interpreter's installed packages (site-packages), deduplicated."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    roots: list[Path] = []
    for candidate in candidates:
        root = Path(candidate)
        if root.is_dir() and all(root.resolve() != r.resolve() for r in roots):
            roots.append(root)
    return roots


def corpus_roots(corpus: str) -> list[tuple[str, Path]]:
    """(label, directory) pairs of ``corpus``; a document's name is ``label/relative path``
    (the label is empty for "stdlib" and a directory, which keeps their names unchanged)."""
    if corpus == "stdlib":
        return [("", stdlib_root())]
    if corpus == "python":
        packages = package_roots()
        return [("stdlib", stdlib_root())] + [
            (root.name if i == 0 else f"{root.name}{i}", root) for i, root in enumerate(packages)
        ]
    root = Path(corpus)
    if not root.is_dir():
        raise ValueError(
            f"data.corpus: {corpus!r} is neither 'stdlib', 'python', 'synthetic' nor a directory"
        )
    return [("", root)]


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
    """Documents of ``corpus`` ("stdlib", "python" or a directory), in order; undecodable bytes
    replaced."""
    roots = corpus_roots(corpus)
    files = [
        (label, root, path) for label, root in roots for path in corpus_files(root, extensions)
    ]
    if max_files > 0:
        files = files[:max_files]
    if not files:
        where = ", ".join(str(root) for _, root in roots)
        raise ValueError(f"data.corpus: no {list(extensions)} files under {where}")
    for label, root, path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        name = path.relative_to(root).as_posix()
        yield Document(f"{label}/{name}" if label else name, text)


def corpus_digest(corpus: str, extensions: tuple[str, ...] = (".py",)) -> str:
    """A digest of the names and sizes of ``corpus``'s files: it changes when the installed
    packages (or the directory) change, so a dataset built from other files is not reused."""
    digest = hashlib.sha256()
    for label, root in corpus_roots(corpus):
        for path in corpus_files(root, extensions):
            digest.update(
                f"{label}/{path.relative_to(root).as_posix()}:{path.stat().st_size};".encode()
            )
    return digest.hexdigest()[:16]


def is_held_out(name: str, fraction: float) -> bool:
    """Whether a document goes to validation: a hash of its name, so the split never shifts."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
