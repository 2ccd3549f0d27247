"""A smaller datastore from a prepared dataset: its first training shards, for measuring how a
datastore's size trades drafts for scan time (``prompt_lookup_datastore``).

The new folder links the source's tokenizer and first ``--shards`` training shards (16.8M
tokens each by default) and records their token count in its own ``meta.json``, which is what
``load_datastore`` checks.

    python benchmarks/datastore_subset.py runs/data/python-8k runs/data/python-8k-1shard --shards 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def make_subset(source: Path, target: Path, shards: int) -> int:
    """Write the subset folder; returns its training tokens."""
    files = sorted(source.glob("train_*.npy"))[:shards]
    if shards < 1 or not files:
        raise SystemExit(f"--shards must be at least 1 and {source} must hold train_*.npy")
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer").symlink_to((source / "tokenizer").resolve())
    for file in files:
        (target / file.name).symlink_to(file.resolve())
    meta = json.loads((source / "meta.json").read_text())
    tokens = sum(len(np.load(f, mmap_mode="r")) for f in files)
    meta["stats"]["train"] = {"documents": None, "bytes": None, "tokens": tokens}
    meta["subset_of"] = str(source)
    (target / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("source", type=Path, help="a dataset folder that `parallm train` prepared")
    ap.add_argument("target", type=Path, help="the new folder (must not exist)")
    ap.add_argument("--shards", type=int, default=1, help="how many training shards to keep")
    args = ap.parse_args()
    if args.target.exists():
        raise SystemExit(f"{args.target} exists")
    tokens = make_subset(args.source, args.target, args.shards)
    print(f"{args.target}: {tokens:,} training tokens from {args.source}")


if __name__ == "__main__":
    main()
