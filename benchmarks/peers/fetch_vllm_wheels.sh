#!/usr/bin/env bash
# Download vLLM 0.26.0 and the wheels it needs beyond the GPU machine's image (the list in
# vllm-wheels.txt) and lay them out for the device tool, which carries at most 64 MiB a call,
# the working tree included (../shared/peers/vllm-0.26.0.md, /work/.library/device/README.md):
# - the vllm wheel, trimmed of what an H200 run never loads (trim_vllm_wheel.py says what), is
#   split into parts that fit beside the working tree: one part per folder .peers/carry1..N-1;
# - .peers/carryN holds the small wheels; .peers/data the Azure conversation trace;
# - every carry folder holds MANIFEST.md5 (each part, the trimmed wheel, each small wheel), so
#   the device side checks each part as it arrives and the whole wheel before installing.
# Nothing here is tracked: .peers/ is in .gitignore.
# Usage, in the repository root where PyPI is reachable: bash benchmarks/peers/fetch_vllm_wheels.sh
# Environment: PEERS_DIR (default .peers); PART_MIB (default: what fits beside the working tree);
# TRACE (default ../shared/traces/AzureLLMInferenceTrace_conv.csv); PY (a Python with pip).
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS_DIR=${PEERS_DIR:-.peers}
TRACE=${TRACE:-../shared/traces/AzureLLMInferenceTrace_conv.csv}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIST=benchmarks/peers/vllm-wheels.txt
WHEELS=$PEERS_DIR/wheels
CARRY_LIMIT_MIB=64
MARGIN_MIB=4  # the tree grows between now and the device calls

git check-ignore -q "$PEERS_DIR/x" || { echo "$PEERS_DIR is not ignored by git: add it to .gitignore" >&2; exit 1; }
mkdir -p "$WHEELS"

# ---- download: exactly the pinned wheels, for Python 3.12 on x86-64 ----
# pip matches manylinux_2_N tags exactly, so the N these wheels use are all named.
platforms=()
for tag in manylinux_2_{39,35,34,31,28,27,26,24,17}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mapfile -t pins < <(grep -Ev '^\s*(#|$)' "$LIST")
echo "downloading ${#pins[@]} wheels into $WHEELS"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$WHEELS" "${pins[@]}" 2> >(grep -v "is neither a file nor a directory" >&2)

# One wheel per pin: a stale wheel of another version would stop the whole install there.
normalize() { echo "$1" | sed -E 's/[-_.]+/_/g' | tr '[:upper:]' '[:lower:]'; }
small=()
for pin in "${pins[@]}"; do
  stem=$(normalize "${pin%%==*}"); version=${pin#*==}
  wanted=""
  for w in "$WHEELS"/*.whl; do
    file=$(basename "$w")
    [ "$(normalize "${file%%-*}")" = "$stem" ] || continue
    if [ "$(echo "$file" | cut -d- -f2)" = "$version" ]; then wanted=$w
    else echo "removing stale $file"; rm -f "$w"; fi
  done
  [ -n "$wanted" ] || { echo "no wheel for $pin in $WHEELS" >&2; exit 1; }
  [ "$stem" = vllm ] && vllm_wheel=$wanted || small+=("$wanted")
done

# ---- trim and split the vllm wheel ----
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
tree_mib=$(( (tree_bytes + 1048575) / 1048576 ))
PART_MIB=${PART_MIB:-$(( CARRY_LIMIT_MIB - tree_mib - MARGIN_MIB ))}
[ "$PART_MIB" -ge 8 ] || { echo "the working tree ($tree_mib MiB) leaves no room to carry parts" >&2; exit 1; }

rm -rf "$PEERS_DIR"/carry[0-9]* "$PEERS_DIR/data" "$PEERS_DIR/trimmed"
mkdir -p "$PEERS_DIR/trimmed"
trimmed=$PEERS_DIR/trimmed/$(basename "$vllm_wheel")
"$PY" benchmarks/peers/trim_vllm_wheel.py "$vllm_wheel" "$trimmed"
split -b "${PART_MIB}M" -d -a 2 "$trimmed" "$PEERS_DIR/trimmed/vllm.whl.part"
parts=("$PEERS_DIR"/trimmed/vllm.whl.part*)
n_parts=${#parts[@]}
last=$((n_parts + 1))

manifest=$PEERS_DIR/trimmed/MANIFEST.md5
{
  (cd "$PEERS_DIR/trimmed" && md5sum vllm.whl.part* "$(basename "$trimmed")")
  for w in "${small[@]}"; do (cd "$WHEELS" && md5sum "$(basename "$w")"); done
} > "$manifest"

for i in $(seq 1 "$n_parts"); do
  mkdir -p "$PEERS_DIR/carry$i"
  mv "${parts[$((i - 1))]}" "$PEERS_DIR/carry$i/"
  cp "$manifest" "$PEERS_DIR/carry$i/"
done
mkdir -p "$PEERS_DIR/carry$last" "$PEERS_DIR/data"
cp "${small[@]}" "$manifest" "$PEERS_DIR/carry$last/"
if [ -f "$TRACE" ]; then cp "$TRACE" "$PEERS_DIR/data/"
else echo "note: no trace at $TRACE; the serving comparison needs one (TRACE=...)" >&2; fi

# ---- check: the parts make the trimmed wheel, and every file matches the manifest ----
joined=$(cat "$PEERS_DIR"/carry*/vllm.whl.part* | md5sum | cut -d' ' -f1)
grep -q "^$joined  $(basename "$trimmed")$" "$manifest" \
  || { echo "the parts do not put the trimmed vllm wheel back together" >&2; exit 1; }
for dir in "$PEERS_DIR"/carry*; do
  (cd "$dir" && md5sum --quiet -c --ignore-missing MANIFEST.md5) || { echo "md5 mismatch in $dir" >&2; exit 1; }
done
rm -f "$PEERS_DIR"/trimmed/vllm.whl.part*

echo
echo "working tree ${tree_mib} MiB; parts of ${PART_MIB} MiB; every carry must stay under ${CARRY_LIMIT_MIB} MiB with the tree:"
du -sm "$PEERS_DIR"/carry* "$PEERS_DIR/data" | awk '{printf "  %-16s %4d MiB\n", $2, $1}'
echo
# Calls: the carry folders in order, packed greedily so each call carries at most PART_MIB
# (the tree beside it fills the rest); the trace travels with the last.
echo "device calls, back to back (the machine goes back about 30 s after a call ends):"
budget=$(( PART_MIB * 1048576 + 65536 ))
calls=(); current=""; used=0
for i in $(seq 1 "$last"); do
  size=$(du -sb "$PEERS_DIR/carry$i" | cut -f1)
  if [ -n "$current" ] && [ $((used + size)) -gt "$budget" ]; then calls+=("$current"); current=""; used=0; fi
  current+="${current:+, }\"$PEERS_DIR/carry$i\""; used=$((used + size))
done
calls+=("$current, \"$PEERS_DIR/data\"")
n=0
for c in "${calls[@]}"; do
  n=$((n + 1))
  echo "  $n. run(carry=[$c], command=\"bash benchmarks/peers/install_vllm.sh\")"
done
# What is left of issue 14 (benchmarks/peers/README.md says why each): the 8B at x4 with both
# engines' steps timed by shape in one phase of the load; Qwen at both loads, profiled too.
for call in \
  "bash benchmarks/peers/run_peers.sh --models llama-3.1-8b --steps serve --servers parallm,vllm-stock --time-scales 4 --profile-seconds 6 --profile-at 0.5" \
  "bash benchmarks/peers/run_peers.sh --models qwen3-0.6b --steps serve --servers parallm,vllm-stock --profile-seconds 2"; do
  n=$((n + 1))
  echo "  $n. run(carry=[\"$PEERS_DIR/data\"], command=\"$call\", timeout_s=600)"
done
echo "(benchmarks/peers/README.md: what each call prints, device time, what to do when one fails)"
