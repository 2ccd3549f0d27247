"""Small Azure-style trace CSVs and `bench serve` JSONs for the benches' tests (the real trace
is carried data)."""

from __future__ import annotations

import json
from pathlib import Path


def write_trace(path: Path, rows: list[tuple[int, int]]) -> Path:
    """A trace of (ContextTokens, GeneratedTokens) rows at ``path``."""
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"t,{p},{o}\n" for p, o in rows))  # fmt: skip
    return path


def write_serve_json(folder: Path, name: str, records: list[dict]) -> Path:
    """``folder/NAME.json`` as `parallm bench serve --out` writes it, with these per-request
    records and no summary."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"benchmark": "serve", "requests": records}))
    return path
