"""Issue 13's size check: lines of the inference package (models, layers, kernels, engine)
against an earlier commit, with the code that later issues' features added set apart.

Every line of the current tree is attributed by ``git blame -M -C -C`` to the commit that wrote
it (a line moved or copied between files keeps the commit that first wrote it). A
commit is a *feature* commit when its message names issues 14-18 or one of their features
(quantization, fp8/int8, speculation and drafts, trees, verify graphs, tensor and data
parallelism, the engine core process) and does not name issue 13; whole modules that only
those features need are counted apart as well. What remains (lines older than ``--base``, and
the refactor's own lines, its seams included) is what issue 13 compares with the base tree.
``--commits`` lists every commit with its lines and class, so the attribution can be audited.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
from pathlib import Path

FOLDERS = ("models", "layers", "kernels", "engine")
FEATURE_MODULES = (
    "parallm/engine/spec", "parallm/engine/core", "parallm/engine/dp_router.py",
    "parallm/engine/data_parallel.py", "parallm/engine/step_channel.py",
    "parallm/engine/executor.py", "parallm/engine/tp_", "parallm/engine/verify_graph.py",
    "parallm/layers/quantization", "parallm/kernels/quant_gemv.py",
)  # fmt: skip
FEATURE = re.compile(
    r"issue 1[4-8]|fp8|int8|quantiz|speculat|draft|medusa|tree|verify|tensor.parallel|\bTP\b"
    r"|engine core|data.parallel|kv_cache_dtype|e4m3|scaled_mm|rejection",
    re.IGNORECASE,
)
ISSUE_13 = re.compile(r"issue 13", re.IGNORECASE)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def package_files(rev: str) -> list[str]:
    paths = git("ls-tree", "-r", "--name-only", rev, "--", *(f"parallm/{d}" for d in FOLDERS))
    return [p for p in paths.split() if p.endswith(".py")]


def line_commits(path: str) -> list[str]:
    porcelain = git("blame", "-M", "-C", "-C", "--line-porcelain", "HEAD", "--", path)
    return re.findall(r"^([0-9a-f]{40}) \d+ \d+", porcelain, re.MULTILINE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--base", default="3393684", help="the tree issue 13 compares with")
    p.add_argument("--commits", action="store_true", help="list every commit's lines and class")
    args = p.parse_args()
    base_lines = sum(git("show", f"{args.base}:{f}").count("\n") for f in package_files(args.base))
    older = set(git("rev-list", args.base).split())
    messages: dict[str, str] = {}
    per_class: collections.Counter[str] = collections.Counter()
    per_commit: collections.Counter[str] = collections.Counter()
    for path in package_files("HEAD"):
        if path.startswith(FEATURE_MODULES):
            per_class["feature modules"] += Path(path).read_text().count("\n")
            continue
        for commit in line_commits(path):
            if commit not in messages:
                messages[commit] = git("log", "-1", "--format=%B", commit)
            message = messages[commit]
            if commit in older:
                kind = "older than base"
            elif FEATURE.search(message) and not ISSUE_13.search(message):
                kind = "feature lines"
            else:
                kind = "refactor"
            per_class[kind] += 1
            per_commit[commit] += 1
    total = sum(per_class.values())
    same_scope = per_class["older than base"] + per_class["refactor"]
    print(f"base {args.base}: {base_lines} lines")
    print(f"HEAD: {total} lines: " + ", ".join(f"{k} {v}" for k, v in per_class.items()))
    print(
        f"HEAD without later issues' features: {same_scope} ({same_scope / base_lines:.3f} x base)"
    )
    if args.commits:
        for commit, n in per_commit.most_common():
            if commit in older:
                continue
            message = messages[commit]
            kind = (
                "feature"
                if FEATURE.search(message) and not ISSUE_13.search(message)
                else "refactor"
            )
            print(f"{n:5d} {kind:8s} {commit[:7]} {message.splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
