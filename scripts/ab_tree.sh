#!/usr/bin/env bash
# A tree under test for a device call: REV's files (package, benchmarks, tests, configs) under
# .ab/NAME, its commit in .ab/NAME/.commit, and its bundled weights a relative link to this
# checkout's copy when they are the same bytes (the device call uploads 64 MiB at most, and a
# link inside the checkout travels as one). Carry ".ab" in the call; run the tree's commands
# from inside it (`cd .ab/NAME && PYTHONPATH=$PWD python3 ...`) so that it imports its own
# package.
#
# Usage: scripts/ab_tree.sh NAME REV      e.g. scripts/ab_tree.sh tailgraph tail-graph
set -euo pipefail
(( $# == 2 )) || { echo "usage: $0 NAME REV" >&2; exit 2; }
name=$1 rev=$2
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "ab_tree: NAME must be letters, digits, - or _" >&2; exit 2; }
root=$(git rev-parse --show-toplevel)
commit=$(git -C "$root" rev-parse --short --verify "$rev^{commit}")
dest=$root/.ab/$name
rm -rf "$dest" && mkdir -p "$dest"
git -C "$root" archive "$commit" | tar -x -C "$dest"
echo "$commit" > "$dest/.commit"
weights=parallm/assets/code-model/model.safetensors
if [[ -f $dest/$weights ]] && cmp -s "$dest/$weights" "$root/$weights"; then
  rm "$dest/$weights"
  ln -s "../../../../../$weights" "$dest/$weights"
fi
echo "ab_tree: $rev ($commit) in .ab/$name, $(du -sh "$dest" | cut -f1) to upload"
