#!/usr/bin/env bash
# On the GPU machine, after install_vllm.sh said "vllm ready": parallm and vLLM side by side.
# Usage: bash benchmarks/peers/run_peers.sh smoke           (a small run of both: does vLLM work)
#        bash benchmarks/peers/run_peers.sh [run_vllm.py flags]   (python3 run_vllm.py --help)
# Output: $OUT/summary.md, $OUT/summary.json, $OUT/peers-*.tar.gz, $OUT/run_peers.log.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/peers/vllm_env.sh
export PARALLM_COMMIT=${PARALLM_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
{
  echo "== run_peers $(date -u +%H:%M:%S), commit $PARALLM_COMMIT"
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader
  python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/run_peers.log"
python3 -c "import vllm" 2>/dev/null || { echo "vllm does not import: run the install calls first (README.md)" | tee -a "$OUT/run_peers.log"; exit 3; }
if [ "${1:-}" = smoke ]; then shift; set -- --models qwen3-0.6b --steps smoke "$@"; fi
python3 benchmarks/peers/run_vllm.py "$@" 2>&1 | tee -a "$OUT/run_peers.log"
