"""Small Azure-style trace CSVs for the benches' tests (the real trace is carried data)."""

from __future__ import annotations

from pathlib import Path


def write_trace(path: Path, rows: list[tuple[int, int]]) -> Path:
    """A trace of (ContextTokens, GeneratedTokens) rows at ``path``."""
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"t,{p},{o}\n" for p, o in rows))  # fmt: skip
    return path
