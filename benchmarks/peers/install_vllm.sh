#!/usr/bin/env bash
# On the GPU machine (no network): gather the carried pieces of vLLM 0.26.0 call by call, and
# install it once they are all there. Run it in every call that carries .peers/carry* folders
# (fetch_vllm_wheels.sh prints the calls). Each call:
#   1. copies the parts and wheels of the carried folders to $PARTS (outside the repository, so
#      they outlive the call while the machine stays warm) and checks each against MANIFEST.md5;
#   2. says which pieces are still missing, and stops there if any is;
#   3. otherwise puts the vllm wheel back together, checks its md5, installs every wheel with
#      pip --no-index --no-deps --target $SITE, and imports vllm and its engine core with the
#      environment vllm_env.sh sets (a failure shows the missing module).
# Logs go to $OUT/install_vllm.log. Exit status: 0 installed (or already), 3 pieces missing,
# 1 a check or the install failed.
# Environment: PARTS (default /tmp/vllm-parts), SITE (default /tmp/vllm-site), OUT, CARRIED
# (where the carried folders are; default .peers).
set -uo pipefail
cd "$(dirname "$0")/../.."
PARTS=${PARTS:-/tmp/vllm-parts}
SITE=${SITE:-/tmp/vllm-site}
OUT=${OUT:-/tmp/out}
CARRIED=${CARRIED:-.peers}
PIP=${PIP:-python3 -m pip}
if ! $PIP --version > /dev/null 2>&1; then PIP=""; fi  # then the wheels are unpacked by hand
mkdir -p "$PARTS" "$OUT"
LOG=$OUT/install_vllm.log

install() {
echo "== install_vllm $(date -u +%H:%M:%S) on $(hostname)"

# 1. stage what this call carried
for dir in "$CARRIED"/carry*/; do
  [ -f "$dir/MANIFEST.md5" ] || continue
  cp "$dir/MANIFEST.md5" "$PARTS/"
  for f in "$dir"/vllm.whl.part* "$dir"/*.whl; do
    [ -f "$f" ] || continue
    name=$(basename "$f")
    want=$(awk -v n="$name" '$2 == n {print $1}' "$dir/MANIFEST.md5")
    got=$(md5sum < "$f" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then echo "md5 mismatch: $dir$name ($got, manifest $want)"; exit 1; fi
    cp "$f" "$PARTS/$name" && echo "staged $name"
  done
done
[ -f "$PARTS/MANIFEST.md5" ] || { echo "no MANIFEST.md5 carried yet: carry a .peers/carry* folder"; exit 3; }

# 2. what is still missing
wheel=$(awk '$2 ~ /^vllm-.*\.whl$/ {print $2}' "$PARTS/MANIFEST.md5")
missing=()
while read -r sum name; do
  [ "$name" = "$wheel" ] && continue
  if [ ! -f "$PARTS/$name" ] || [ "$(md5sum < "$PARTS/$name" | cut -d' ' -f1)" != "$sum" ]; then
    missing+=("$name")
  fi
done < "$PARTS/MANIFEST.md5"
if [ ${#missing[@]} -gt 0 ]; then
  parts_missing=$(printf '%s\n' "${missing[@]}" | grep '^vllm.whl.part' | tr '\n' ' ')
  wheels_missing=$(printf '%s\n' "${missing[@]}" | grep -vc '^vllm.whl.part')
  echo "still missing: vllm parts [ ${parts_missing}] and ${wheels_missing} small wheels (the last carry)"
  echo "(a machine that went back between calls lost the staged pieces: start again at carry1)"
  exit 3
fi

# 3. reassemble, check, install (once per wheel set)
stamp=$SITE/.installed-$(md5sum < "$PARTS/MANIFEST.md5" | cut -c1-12)
if [ -f "$stamp" ]; then
  echo "already installed in $SITE"
else
  cat "$PARTS"/vllm.whl.part* > "$PARTS/$wheel"
  want=$(awk -v n="$wheel" '$2 == n {print $1}' "$PARTS/MANIFEST.md5")
  got=$(md5sum < "$PARTS/$wheel" | cut -d' ' -f1)
  [ "$want" = "$got" ] || { echo "reassembled $wheel: md5 $got, manifest $want"; exit 1; }
  echo "reassembled $wheel ($(du -m "$PARTS/$wheel" | cut -f1) MiB), md5 ok"
  rm -rf "$SITE" && mkdir -p "$SITE"
  start=$(date +%s)
  if [ -n "$PIP" ]; then
    $PIP install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$PARTS"/*.whl || { echo "pip install failed"; exit 1; }
  else
    # No pip for this python: a wheel is a zip whose root goes to site-packages, and whose
    # NAME.data/{purelib,platlib} go there too (console scripts are not needed: python3 -m).
    echo "no pip: unpacking the wheels into $SITE"
    python3 - "$SITE" "$PARTS"/*.whl <<'UNPACK' || { echo "unpacking failed"; exit 1; }
import shutil, sys, zipfile
from pathlib import Path
site = Path(sys.argv[1])
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
for data in site.glob("*.data"):
    for lib in ("purelib", "platlib"):
        if (data / lib).is_dir():
            shutil.copytree(data / lib, site, dirs_exist_ok=True)
    shutil.rmtree(data)
for so in site.rglob("*.so"):
    so.chmod(0o755)
UNPACK
  fi
  echo "installed $(ls "$PARTS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - start )) s"
  touch "$stamp"
fi

# The import check, with the environment the runs use.
source benchmarks/peers/vllm_env.sh
python3 - <<'EOF' || { echo "import check failed (see the traceback above)"; exit 1; }
import time
start = time.perf_counter()
import torch
import vllm
import vllm.v1.engine.core  # imports llguidance and xgrammar through annotations
import vllm.entrypoints.openai.api_server  # what `vllm serve` needs
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"import vllm {vllm.__version__} ok in {time.perf_counter() - start:.1f} s; "
      f"torch {torch.__version__}, {gpu}")
EOF
echo "vllm ready: PYTHONPATH=$SITE"
}

# Through tee in a pipeline, not `exec > >(tee)`: the call's output then ends when the log does.
install 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
