# Sourced on the GPU machine before anything imports vLLM (../shared/peers/vllm-0.26.0.md).
# The installed wheels come first on the path, then the repository (parallm).
SITE=${SITE:-/tmp/vllm-site}
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
# Without flashinfer (not carried) the sampler must not try it: its constructor imports it.
export VLLM_USE_FLASHINFER_SAMPLER=0
# No network there: no Hub look-ups, no usage reports.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
# vLLM and Triton cache compiled code under HOME.
if [ -z "${HOME:-}" ] || [ ! -w "$HOME" ]; then export HOME=/tmp/vllm-home; mkdir -p "$HOME"; fi
