#!/usr/bin/env bash
# Speed of two trees in one device call, alternating round by round, so that only their ratio is
# read: an earlier commit's package (in .ab/old) against this tree. Issue 13's "must hold" table.
#
# Here, once:  echo /.ab/ >> .git/info/exclude; mkdir -p .ab/old
#              git archive REV parallm | tar -x -C .ab/old
# Device run:  carry [".ab"], command: OUT=$OUT bash scripts/ab_trees.sh [ROUNDS]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: runs cd to their tree
ROUNDS=${1:-2}
[ -d .ab/old/parallm ] || { echo "ab_trees: .ab/old/parallm is missing (see the header)"; exit 2; }
configs=$PWD/benchmarks/configs
# `python3 -m` and `-c` put the working directory first on sys.path, ahead of PYTHONPATH: each
# run starts in its tree (from the repository root, the old side imported this tree's package).
for tree in "$PWD/.ab/old" "$PWD"; do  # which package each side imports, before any device time
  got=$(cd "$tree" && PYTHONPATH=$tree python3 -c 'import importlib.util as u; print(u.find_spec("parallm").origin)')
  [[ $got == "$tree/parallm/__init__.py" ]] || { echo "ab_trees: $tree imports parallm from ${got:-nowhere}"; exit 2; }
done
run() {  # run TREE NAME ARGS...: one benchmark of TREE's package
  local tree=$1 name=$2; shift 2
  (cd "$tree" && PYTHONPATH=$tree python3 -m parallm.cli bench "$@" --out "$OUT/$name.json") \
    > "$OUT/$name.log" 2>&1 || echo "ab_trees: $name failed (see $OUT/$name.log)"
}
for round in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    tree=$([ $side = old ] && echo "$PWD/.ab/old" || echo "$PWD")
    tag="${side}_r${round}"
    run "$tree" "latency_1b_$tag" latency --config "$configs/llama-3.2-1b.json" \
      --max-model-len 4096 --batch-sizes 1,8,32,128
    run "$tree" "latency_8b_$tag" latency --config "$configs/llama-3.1-8b.json" \
      --max-model-len 4096 --batch-sizes 1 --iters 2
    run "$tree" "throughput_qwen_$tag" throughput --config "$configs/qwen3-0.6b.json" \
      --max-model-len 4096
    run "$tree" "throughput_1b_$tag" throughput --config "$configs/llama-3.2-1b.json" \
      --max-model-len 4096
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
from collections import defaultdict
out = sys.argv[1]
table = defaultdict(lambda: defaultdict(list))
for path in sorted(glob.glob(os.path.join(out, "*_r*.json"))):
    name = os.path.basename(path)[:-5]
    bench, side = name.rsplit("_", 2)[0], name.rsplit("_", 2)[1]
    data = json.load(open(path))
    rows = data["results"][:1] if "output_tokens_per_s" in data["results"][0] else data["results"]
    for row in rows:
        for key in ("ms_per_token", "output_tokens_per_s"):
            if key in row:
                table[(bench, row.get("batch_size", ""), key)][side].append(row[key])
print(f"{'benchmark':<20}{'batch':>6}{'metric':>22}{'old':>12}{'new':>12}{'new/old':>9}")
for (bench, batch, key), sides in sorted(table.items()):
    if not (sides["old"] and sides["new"]):  # a run that failed on one side wrote no JSON
        ran = " ".join(s for s in ("old", "new") if sides[s])
        print(f"{bench:<20}{batch!s:>6}{key:>22}  only {ran} ran: see the other's log")
        continue
    old, new = (min(sides[s]) if "ms" in key else max(sides[s]) for s in ("old", "new"))
    print(f"{bench:<20}{batch!s:>6}{key:>22}{old:>12.4f}{new:>12.4f}{new / old:>9.3f}")
PY
