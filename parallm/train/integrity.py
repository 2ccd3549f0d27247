"""Checkpoint integrity: a manifest of every file's size and digest, checked before loading.

The manifest (``manifest.json``) is written into a checkpoint after all of its files and before
the rename that makes it complete, so a complete checkpoint whose bytes differ from the manifest
was damaged afterwards (disk, copy, a stray write). ``train_state.json`` names the manifest, so
a checkpoint that should have one but lost it is told apart from one written before manifests
existed, which loads unverified.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"
DIGEST = "xxh3_128"  # fast (memory speed) and good at catching accidental damage
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint is damaged or cannot be loaded; the message names its path and the fault."""

    def __init__(self, path: Path, problem: str, subject: str = "checkpoint") -> None:
        super().__init__(f"{subject} {path} {problem}")
        self.path, self.problem = path, problem


def file_digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Digest every file under ``folder`` (recursively) into ``folder/manifest.json``."""
    files = {
        path.relative_to(folder).as_posix(): {
            "bytes": path.stat().st_size,
            "digest": file_digest(path),
        }
        for path in _files(folder)
    }
    manifest = {"algorithm": DIGEST, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_checkpoint(path: Path) -> bool:
    """Check ``path`` against its manifest: True if verified, False if it predates manifests.

    Raises :class:`CheckpointError` naming every file that is missing, resized or changed.
    """
    if not path.is_dir():
        raise CheckpointError(path, "does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return _check_unverifiable(path)
    try:
        manifest = json.loads(manifest_path.read_text())
        algorithm, files = manifest["algorithm"], manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"is damaged: its {MANIFEST} cannot be read ({e})") from None
    if algorithm != DIGEST:
        raise CheckpointError(path, f"has a {MANIFEST} with an unknown digest {algorithm!r}")
    problems = [p for name, entry in files.items() if (p := _file_problem(path, name, entry))]
    if problems:
        raise CheckpointError(path, "is damaged: " + "; ".join(problems))
    return True


def _file_problem(folder: Path, name: str, entry: dict[str, Any]) -> str | None:
    file = folder / name
    if not file.is_file():
        return f"{name} is missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        return (
            f"{name} has {size} bytes where {entry['bytes']} were written (truncated or replaced)"
        )
    if file_digest(file) != entry["digest"]:
        return f"{name} does not match the {DIGEST} digest recorded when it was written"
    return None


def _check_unverifiable(path: Path) -> bool:
    """A checkpoint without a manifest: damaged if its train state says it had one."""
    for required in (DCP_METADATA, TRAIN_STATE):
        if not (path / required).is_file():
            raise CheckpointError(path, f"is damaged: {required} and {MANIFEST} are missing")
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"is damaged: {TRAIN_STATE} cannot be read ({e})") from None
    if isinstance(state, dict) and state.get("manifest") == MANIFEST:
        raise CheckpointError(path, f"is damaged: its {MANIFEST} is missing")
    return False
