#!/usr/bin/env bash
# One device call: the environment, then each step named (the `case` labels below) in turn.
# Usage on the device machine: OUT=dir bash scripts/gpu_session.sh [STEP...] (default: tests latency)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# .git does not travel to the device; record the commit here with `git rev-parse --short HEAD > .commit`.
export PARALLM_COMMIT=${PARALLM_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
# A server in the background on port 8000 for the serving steps; stop_server ends it (SIGTERM).
start_server() {  # start_server LOG ARGS...
  local log=$1; shift
  python3 -m parallm.cli serve "$@" --port 8000 > "$log" 2>&1 &
  server=$!
  for _ in $(seq 300); do  # until it answers, or has exited
    kill -0 "$server" 2> /dev/null || { echo "server exited:"; tail -5 "$log"; return 1; }
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health')" 2> /dev/null \
      && { head -3 "$log"; return 0; }
    sleep 1
  done
  echo "server did not answer /health in 300 s:"; tail -5 "$log"; stop_server; return 1
}
stop_server() { kill -TERM "$server"; wait "$server"; }
server_wheels() {  # the server stack is not on the device image: install it from .whl/
  local wheels="--no-index --find-links .whl/server fastapi uvicorn uvloop httptools httpx aiohttp prometheus-client pyzmq msgspec openai"
  if python3 -m pip --version > /dev/null 2>&1; then python3 -m pip install -q $wheels
  else pip install -q --target "$PWD/.pylib" $wheels; fi > "$OUT/pip.log" 2>&1
  export PYTHONPATH=$PYTHONPATH:$PWD/.pylib
  python3 -c "import fastapi, uvicorn, uvloop, httptools, httpx, aiohttp, prometheus_client, zmq, msgspec, openai" || tail -5 "$OUT/pip.log"
}
(( $# )) || set -- tests latency  # ("${@:-tests latency}" would be the one step "tests latency")
for step in "$@"; do
  case $step in
    tests) # every GPU test, 8 at a time, then the multi-GPU ones one at a time (each fills or
           # counts a card's memory that the others would change); server tests need
           # `server_wheels` first: `tests` after `serve`, or carry .whl
           [[ -d .whl/server ]] && server_wheels
           files=$(grep -rl "pytest.mark.gpu" tests --include="test_*.py")
           python3 -m pytest -q -n 8 -m "gpu and not multi_gpu" $files \
             -p no:cacheprovider --timeout 240 --continue-on-collection-errors -rfE 2>&1 \
             | tee "$OUT/pytest_gpu.log" | tail -25
           if (( $(nvidia-smi -L | wc -l) > 1 )); then
             python3 -m pytest -q -m multi_gpu $files -p no:cacheprovider --timeout 240 -rfE 2>&1 \
               | tee "$OUT/pytest_multi_gpu.log" | tail -15
           fi ;;
    latency) python3 -m parallm.cli bench latency --config benchmarks/configs/llama-3.2-1b.json \
               --max-model-len 4096 --out "$OUT/latency_llama1b.json" 2>&1 | tail -12 ;;
    latencyunfused) python3 -m parallm.cli bench latency --config benchmarks/configs/llama-3.2-1b.json \
               --max-model-len 4096 --no-fused-kernels --out "$OUT/latency_llama1b_unfused.json" 2>&1 | tail -12 ;;
    fusedbench) python3 benchmarks/fused_ops_bench.py --graph > "$OUT/fused_ops.log" 2>&1; tail -24 "$OUT/fused_ops.log" ;;
    latency8b) python3 -m parallm.cli bench latency --config benchmarks/configs/llama-3.1-8b.json \
               --max-model-len 4096 --batch-sizes 1,8,32 --out "$OUT/latency_llama8b.json" 2>&1 | tail -10 ;;
    throughput) python3 -m parallm.cli bench throughput --config benchmarks/configs/qwen3-0.6b.json \
               --max-model-len 4096 --compare-hf --out "$OUT/throughput_qwen3.json" 2>&1 | tail -8 ;;
    throughput1b) python3 -m parallm.cli bench throughput --config benchmarks/configs/llama-3.2-1b.json \
               --max-model-len 4096 --out "$OUT/throughput_llama1b.json" 2>&1 | tail -8 ;;
    latency8b1) python3 -m parallm.cli bench latency --config benchmarks/configs/llama-3.1-8b.json \
               --max-model-len 4096 --batch-sizes 1,8 --iters 2 --out "$OUT/latency_llama8b.json" 2>&1 | tail -8 ;;
    bundled) python3 -m parallm train --config configs/train/code-model.toml --plot 2>&1 | tail -5
             python3 -m parallm export --checkpoint runs/code-model/checkpoints --out runs/export 2>&1 | tail -3
             python3 -m parallm generate --model runs/export "def add(a, b):" --max-tokens 48 2>&1 | tail -6
             mv runs/export/model.safetensors "$OUT/"
             cp runs/code-model/metrics.jsonl runs/code-model/loss.png runs/export/
             cp runs/data/stdlib-8k/meta.json runs/export/data_meta.json
             tar -C runs -cf "$OUT/code-model-rest.tar" export ;;
    profile) python3 benchmarks/profile_decode.py --config benchmarks/configs/llama-3.2-1b.json \
               > "$OUT/profile.log" 2>&1; tail -34 "$OUT/profile.log" ;;
    profileunfused) python3 benchmarks/profile_decode.py --config benchmarks/configs/llama-3.2-1b.json \
               --no-fused-kernels > "$OUT/profile_unfused.log" 2>&1; tail -34 "$OUT/profile_unfused.log" ;;
    attn) python3 benchmarks/attention_bench.py --out "$OUT/attention.json" 2>&1 | tail -40 ;;
    throughput1bhf) python3 -m parallm.cli bench throughput --config benchmarks/configs/llama-3.2-1b.json \
               --max-model-len 4096 --compare-hf --out "$OUT/throughput_llama1b.json" > "$OUT/throughput_llama1b.log" 2>&1
             tail -8 "$OUT/throughput_llama1b.log" ;;
    train1) python3 -m parallm.cli bench train --config benchmarks/configs/llama-3.2-1b.json --seq-len 2048 \
               --micro-batch-size "${MBS:-8}" --steps 20 --warmup-steps 5 --dtype bfloat16 --compile \
               --out "$OUT/train-1gpu.json" > "$OUT/train-1gpu.log" 2>&1 || bash "$0" train1eager
             tail -8 "$OUT/train-1gpu.log" ;;
    train1eager) python3 -m parallm.cli bench train --config benchmarks/configs/llama-3.2-1b.json --seq-len 2048 \
               --micro-batch-size 4 --steps 20 --warmup-steps 5 --dtype bfloat16 \
               --out "$OUT/train-1gpu-eager.json" > "$OUT/train-1gpu-eager.log" 2>&1; tail -8 "$OUT/train-1gpu-eager.log" ;;
    train2) # one GPU, then all GPUs of the machine with the same per-GPU batch (weak scaling)
            args="--config benchmarks/configs/llama-3.2-1b.json --seq-len 2048 --micro-batch-size ${MBS:-8}
                  --steps 20 --warmup-steps 5 --dtype bfloat16 --compile"
            python3 -m parallm.cli bench train $args --out "$OUT/train-1of$(nvidia-smi -L | wc -l).json" \
                > "$OUT/train-1.log" 2>&1; tail -4 "$OUT/train-1.log"
            n=$(nvidia-smi -L | wc -l)
            torchrun --standalone --nproc-per-node "$n" -m parallm.bench.train $args \
                --baseline-json "$OUT/train-1of$n.json" --out "$OUT/train-${n}gpu.json" \
                > "$OUT/train-$n.log" 2>&1; tail -4 "$OUT/train-$n.log" ;;
    serve) # the Azure conversation trace: carry .peers/data (benchmarks/peers/README.md)
           trace=${TRACE:-.peers/data/AzureLLMInferenceTrace_conv.csv}
           [[ -f $trace ]] || { echo "serve: no $trace (carry .peers/data)"; continue; }
           server_wheels
           start_server "$OUT/server.log" --config benchmarks/configs/llama-3.2-1b.json --max-model-len 4096 \
             || continue
           for scale in ${TIME_SCALES:-4 16}; do
             python3 -m parallm.cli bench serve --base-url http://127.0.0.1:8000 \
               --trace "$trace" --time-scale "$scale" \
               --trace-duration-s "${TRACE_DURATION_S:-120}" --max-input-tokens 3500 --slo-ttft-ms 500 --slo-tpot-ms 50 \
               --no-progress --out "$OUT/serve-x$scale.json" --plot "$OUT/serve-x$scale.png" \
               > "$OUT/bench_serve-x$scale.log" 2>&1
             tail -22 "$OUT/bench_serve-x$scale.log"
           done
           python3 scripts/load_test.py --url http://127.0.0.1:8000 --token-ids --clients 200 \
               --duration 20 --json "$OUT/load_test.json" > "$OUT/load_test.log" 2>&1
           tail -12 "$OUT/load_test.log"
           stop_server; tail -3 "$OUT/server.log" ;;
    engineproc) # issue 16: the engine in its own process (the server's default) against the
                # in-process engine: the offline workload (bench throughput's 256 requests,
                # U[100, 1024] in and out, all at once) on the offline engine in this process
                # and in its own (--engine-process); then batch-1 decode (one stream at a time)
                # and the offline workload through the server in each MODES
                server_wheels
                model=${MODEL_ARGS:---config benchmarks/configs/llama-3.2-1b.json --max-model-len 4096}
                lo=${MIN_LEN:-100}; hi=${MAX_LEN:-1024}  # bench throughput's lengths, U[lo, hi]
                mean=$(( (lo + hi) / 2 )); ratio=$(python3 -c "print(($hi - $lo) / ($hi + $lo))")
                python3 -m parallm.cli bench throughput $model --num-requests "${NREQ:-256}" \
                  --min-len "$lo" --max-len "$hi" \
                  --out "$OUT/ep_offline_throughput.json" > "$OUT/ep_offline_throughput.log" 2>&1
                tail -3 "$OUT/ep_offline_throughput.log"
                python3 -m parallm.cli bench throughput $model --num-requests "${NREQ:-256}" \
                  --min-len "$lo" --max-len "$hi" --engine-process \
                  --out "$OUT/ep_process_throughput.json" > "$OUT/ep_process_throughput.log" 2>&1
                tail -2 "$OUT/ep_process_throughput.log"
                python3 -m parallm.cli bench latency $model --batch-sizes 1 --input-len 128 \
                  --output-len "${OUTLEN:-128}" --out "$OUT/ep_offline_latency.json" > "$OUT/ep_offline_latency.log" 2>&1
                tail -3 "$OUT/ep_offline_latency.log"
                for mode in ${MODES:-multiprocess inprocess}; do
                  flag=(); [[ $mode == inprocess ]] && flag=(--disable-frontend-multiprocessing)
                  start_server "$OUT/ep_server_$mode.log" $model "${flag[@]}" || continue
                  common=(--base-url http://127.0.0.1:8000 --dataset-name random --no-progress)
                  python3 -m parallm.cli bench serve "${common[@]}" --num-prompts 8 --max-concurrency 1 \
                    --random-input-len 128 --random-output-len "${OUTLEN:-128}" \
                    --out "$OUT/ep_serve_b1_$mode.json" > "$OUT/ep_serve_b1_$mode.log" 2>&1
                  grep -i "tpot" "$OUT/ep_serve_b1_$mode.log" | head -3
                  python3 -m parallm.cli bench serve "${common[@]}" --num-prompts "${NREQ:-256}" \
                    --random-input-len "$mean" --random-output-len "$mean" --random-range-ratio "$ratio" \
                    --out "$OUT/ep_serve_offline_$mode.json" > "$OUT/ep_serve_offline_$mode.log" 2>&1
                  grep -i "throughput\|tok/s" "$OUT/ep_serve_offline_$mode.log" | head -4
                  stop_server
                done ;;
    epalternate) # issue 16's 2% check: the offline workload in process and in the engine
                 # process, alternated twice (a fresh machine's first run compiles kernels cold)
                 server_wheels
                 model=${MODEL_ARGS:---config benchmarks/configs/llama-3.2-1b.json --max-model-len 4096}
                 for round in 1 2; do
                   for flag in "" --engine-process; do
                     name=ep_alt_${round}${flag:+_process}
                     python3 -m parallm.cli bench throughput $model --num-requests "${NREQ:-256}" $flag \
                       --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
                     echo "$name: $(grep '^parallm' "$OUT/$name.log" | tail -1)"
                   done
                 done ;;
    stepbench) python3 benchmarks/decode_step_bench.py --config benchmarks/configs/llama-3.2-1b.json \
                 --out "$OUT/decode_step.json" > "$OUT/decode_step.log" 2>&1
               tail -4 "$OUT/decode_step.log" ;;
    timeline) for b in 1 128; do python3 benchmarks/profile_decode.py --config benchmarks/configs/llama-3.2-1b.json \
                --timeline --batch $b > "$OUT/timeline$b.log" 2>&1; tail -8 "$OUT/timeline$b.log"; done ;;
    quantprofile) # issue 17: where the 8B batch-1 step's time goes with bf16, fp8 and int8
                  # weights (graph replays, kernel by kernel)
                  for q in none fp8 int8; do
                    flag=(); [[ $q != none ]] && flag=(--quantization "$q")
                    python3 benchmarks/profile_decode.py --config benchmarks/configs/llama-3.1-8b.json \
                      --timeline --batch 1 "${flag[@]}" > "$OUT/quantprofile_$q.log" 2>&1
                    tail -32 "$OUT/quantprofile_$q.log"
                  done ;;
    quanttimeline) # issue 17's offline miss: where a batch-128 decode step of the Qwen3-0.6B
                   # shape spends its time with bf16, and with fp8 weights and an fp8 KV cache
                   for q in none fp8; do
                     flag=(); [[ $q == fp8 ]] && flag=(--quantization fp8 --kv-cache-dtype fp8)
                     python3 benchmarks/profile_decode.py --config benchmarks/configs/qwen3-0.6b.json \
                       --timeline --batch 128 "${flag[@]}" > "$OUT/quanttimeline_$q.log" 2>&1
                     tail -30 "$OUT/quanttimeline_$q.log"
                   done ;;
    quantsweep) # issue 17: the package's one-byte GEMVs (norm, SiLU and plain prologues) over a
                # grid of tiles, about 30 compilations a role and kind: the 8B shape, every role
                # and both kinds unless SHAPES, ROLES (qkv,o,gate_up,down) or KINDS say fewer
                for m in ${SHAPES:-8b}; do
                  python3 benchmarks/quant_gemv_bench.py --model $m --sweep \
                    --roles "${ROLES:-qkv,o,gate_up,down}" --kinds "${KINDS:-int8,fp8}" \
                    --out "$OUT/quant_gemv_sweep_$m.json" > "$OUT/quant_gemv_sweep_$m.log" 2>&1
                  grep -E "default|best" "$OUT/quant_gemv_sweep_$m.log" | tail -24
                done ;;
    quantgemm) # issue 17: fp8 at a decode batch of rows, torch._scaled_mm (per-token fp8 x, the
               # package's choice past one row) against the weight-only Triton GEMM (int8's
               # path, 1.19x bf16 at 8B batch 8 where fp8 through _scaled_mm was 0.95x)
               shapes=$(for m in 2 8 32 64; do for nk in 6144x4096 4096x4096 28672x4096 4096x14336; do
                          printf "%sx%s," $m $nk; done; done)
               python3 benchmarks/quant_gemm_bench.py --device cuda --dtype bf16 --shapes "${shapes%,}" \
                 --out "$OUT/quant_gemm_8b.json" > "$OUT/quant_gemm_8b.log" 2>&1
               tail -40 "$OUT/quant_gemm_8b.log" ;;
    specoracle) # verify graphs against the eager verify first: the table means nothing if they differ;
                # DRAFTER=device measures the device drafter's path (default: host)
                python3 -m pytest -q -m gpu tests/engine/test_verify_graph_gpu.py -p no:cacheprovider \
                  > "$OUT/pytest_verify_graph.log" 2>&1; tail -3 "$OUT/pytest_verify_graph.log"
                for shape in llama-3.1-8b llama-3.2-1b; do
                  python3 benchmarks/spec_oracle_bench.py --config benchmarks/configs/$shape.json \
                    --batch-sizes 1,8,32 --k 2,4,8 --wrong 0,0.25,0.5 --drafter "${DRAFTER:-host}" \
                    --out "$OUT/spec_oracle_$shape.json" > "$OUT/spec_oracle_$shape.log" 2>&1
                  tail -31 "$OUT/spec_oracle_$shape.log"; done ;;
    spectrain) # issue 15's larger code model; its weights stay on the machine for `specreal`;
               # STEPS (default: the recipe's 900) trains fewer, to leave room in the same call
               python3 -m parallm train --config configs/train/code-model-150m.toml --plot \
                 ${STEPS:+--set training.steps=$STEPS} > "$OUT/train150m.log" 2>&1
               tail -8 "$OUT/train150m.log"
               python3 -m parallm export --checkpoint runs/code-model-150m/checkpoints \
                 --out runs/code-model-150m/hf 2>&1 | tail -3
               cp runs/code-model-150m/metrics.jsonl runs/code-model-150m/loss.png "$OUT/" 2>/dev/null
               cp runs/data/python-8k/meta.json "$OUT/python-8k-meta.json" 2>/dev/null ;;
    spectraintests) # `spectrain` with `tests` beside it (their timings do not matter): one call
                    # instead of two. The server wheels go in first, so the corpus that
                    # spectrain reads holds them throughout (as after `tests`)
                    [[ -d .whl/server ]] && server_wheels
                    bash "$0" tests > "$OUT/tests_bg.log" 2>&1 &
                    tests_pid=$!
                    bash "$0" spectrain
                    wait "$tests_pid"; grep -E "passed|failed|FAILED|ERROR" "$OUT/tests_bg.log" | tail -25 ;;
    specheads) # Medusa heads on the frozen 150M model (after `spectrain`, same machine, and
               # before `tests` or `serve`: their wheels go into site-packages, the python
               # corpus changes, and the dataset's fingerprint no longer matches)
               python3 -m parallm train --config configs/train/medusa-code-150m.toml \
                 > "$OUT/train_medusa150m.log" 2>&1; tail -6 "$OUT/train_medusa150m.log"
               python3 -m parallm export --checkpoint runs/medusa-code-150m/checkpoints \
                 --out runs/medusa-code-150m/heads 2>&1 | tail -3 ;;
    specreal) # METHODS (default: every drafter, medusa once specheads' heads exist; also
              # ngram_history: ngram with the default ring (2^16 tokens) of the pass's earlier requests;
              # ngram_datastore: that, then DATASTORE, default the 150M model's training data,
              # runs/data/python-8k; benchmarks/datastore_subset.py makes smaller ones), K drafts
              # (default 4), DTYPE (default: the model's), MIN_TOKENS_PER_STEP (a number or
              # auto; default: unset), LOOKUP_MIN (ngram's prompt_lookup_min, default 2), QUEUE
              # (set: every prompt submitted at once, the batch size running at a time)
              methods=${METHODS:-ngram,draft_model,layer_skip}; heads=()
              if [[ -f runs/medusa-code-150m/heads/config.json ]]; then
                heads=(--medusa-heads runs/medusa-code-150m/heads); [[ -z ${METHODS:-} ]] && methods+=,medusa
              fi
              python3 benchmarks/spec_real_bench.py --target runs/code-model-150m/hf --batch-sizes 1,8 \
                --methods "$methods" --num-speculative-tokens "${K:-4}" --dtype "${DTYPE:-auto}" \
                --prompt-lookup-min "${LOOKUP_MIN:-2}" ${DATASTORE:+--datastore "$DATASTORE"} \
                ${MIN_TOKENS_PER_STEP:+--min-tokens-per-step "$MIN_TOKENS_PER_STEP"} ${QUEUE:+--queue} \
                "${heads[@]}" --out "$OUT/spec_real.json" > "$OUT/spec_real.log" 2>&1; tail -12 "$OUT/spec_real.log" ;;
    specsteps) # issue 15: a speculative step's host time phase by phase against a plain step's,
               # batch 1, on the bundled model and (after `spectrain`) the 150M one
               python3 benchmarks/spec_step_profile.py --methods ngram,layer_skip,draft_model \
                 --out "$OUT/spec_steps_bundled.json" 2>&1 | tail -15
               if [[ -f runs/code-model-150m/hf/config.json ]]; then
                 python3 benchmarks/spec_step_profile.py --model runs/code-model-150m/hf \
                   --corpus python --val-fraction 0.01 --skip-layers 3 \
                   --methods ngram,layer_skip,draft_model --out "$OUT/spec_steps_150m.json" 2>&1 | tail -15
               fi ;;
    prefilltiles) # issue 14: the prefill kernel's tiles swept for prompts of 2,048 and 3,500 tokens
                  # (Qwen3-0.6B and Llama-3.1-8B heads) against the package's tile, SDPA and torch's
                  # FlashAttention varlen, contiguous and paged where this torch has them (~2 min)
                  python3 benchmarks/prefill_tile_sweep.py --out "$OUT/prefill_tiles.json" 2>&1 | tail -48 ;;
    decodeorder) # issue 14: one layer's decode attention with its rows in batch order, longest first
                 # (what the decode graphs stage) and shortest first, on the Azure trace's contexts
                 # at batch 32-256 (Llama-3.1-8B heads; carry .peers/data; ~1 min)
                 trace=${TRACE:-.peers/data/AzureLLMInferenceTrace_conv.csv}
                 [[ -f $trace ]] || { echo "decodeorder: no $trace (carry .peers/data)"; continue; }
                 python3 benchmarks/decode_order_bench.py --trace "$trace" \
                   --out "$OUT/decode_order.json" 2>&1 | tail -9 ;;
    serveab) # issue 14: the 8B served at x4 by parallm from each tree of .ab named in TREES
             # (default: every one), then from this tree, one after the other on one port, each
             # profiled PROFILE_S seconds (default 6) from half its load (carry .whl, .peers/data
             # and .ab; ~150 s a tree, the first also writes the dummy weights)
             server_wheels
             trace=$PWD/.peers/data/AzureLLMInferenceTrace_conv.csv
             [[ -f $trace ]] || { echo "serveab: no $trace (carry .peers/data)"; continue; }
             for tree in ${TREES:-$(ls .ab 2>/dev/null)} .; do
               dir=$PWD; name=main
               [[ $tree != . ]] && dir=$PWD/.ab/$tree && name=$tree
               [[ -d $dir/parallm ]] || { echo "serveab: no tree .ab/$tree"; continue; }
               echo "=== $name ($(cat "$dir/.commit" 2>/dev/null || echo '?'))"
               (cd "$dir" && source benchmarks/peers/vllm_env.sh || exit
                 export PARALLM_COMMIT=$(cat .commit 2>/dev/null || echo unknown)
                 python3 benchmarks/peers/run_vllm.py --models llama-3.1-8b --steps serve \
                   --servers parallm --time-scales 4 --profile-seconds "${PROFILE_S:-6}" \
                   --profile-at 0.5 --trace "$trace" --out "$OUT/serveab_$name" 2>&1 \
                   | grep -v "^INFO\|WARN" | tail -22)
             done ;;
    mixedab) # issue 14: one mixed step (64 rows decoding at 1,024 tokens beside a new prompt of
             # 1,100, 2,100 and 3,521 tokens) of the 8B, then of Qwen3-0.6B, in each tree of .ab
             # named in TREES (default: every one) and in this tree; the start-up line says
             # which graph sizes run eagerly (carry .ab; ~35 s a tree and model)
             for config in llama-3.1-8b qwen3-0.6b; do
               for tree in ${TREES:-$(ls .ab 2>/dev/null)} .; do
                 dir=$PWD; name=main
                 [[ $tree != . ]] && dir=$PWD/.ab/$tree && name=$tree
                 [[ -d $dir/parallm ]] || { echo "mixedab: no tree .ab/$tree"; continue; }
                 echo "=== $name $config ($(cat "$dir/.commit" 2>/dev/null || echo '?'))"
                 log=$OUT/mixedab_${name}_$config.log
                 (cd "$dir" && PYTHONPATH=$dir timeout 150 python3 benchmarks/mixed_step_bench.py \
                   --config "benchmarks/configs/$config.json" --batch-sizes 64 \
                   --arrival-lens 1100,2100,3521 --context-len 1024 --steps 16 --warmup-steps 4 \
                   --profile-steps 2 --gpu-memory-utilization 0.85 > "$log" 2>&1)
                 grep -o "CUDA graphs[^;]*" "$log" | head -1; grep "ms/step" "$log" || tail -3 "$log"
               done
             done ;;
    historyscan) # issue 15: the device tail's ring scan after a datastore of 1M, 16.8M and 103M
                 # tokens, batch 1 and 8, rows that scan and rows with drafts of their own
                 python3 benchmarks/history_scan_bench.py 2>&1 | tail -20 ;;
    specaccept) # issue 15: prompt lookup's variants (occurrence, n range, k, history, datastore,
                # trees of 2 and 3 chains) scored on the 150M model's own greedy outputs (after
                # `spectrain`) and, from its training data (runs/data/python-8k), the datastore's;
                # K: the draft lengths (default the bench's, 4,8)
                python3 benchmarks/ngram_acceptance.py --model runs/code-model-150m/hf --corpus python \
                  --val-fraction 0.01 --min-n 1,2 --max-n 5,8 --datastore runs/data/python-8k \
                  --branches 1,2,3 ${K:+--k "$K"} --out "$OUT/ngram_acceptance_150m.json" 2>&1 | tail -50 ;;
    spectimeline) # issue 15: the GPU timeline of plain and of ngram k = 8 verify steps at batch 1
                  # (150M shape, dummy weights: the steps' cost, not their yield)
                  for spec in '' '{"method":"ngram","num_speculative_tokens":8}'; do
                    python3 benchmarks/profile_decode.py --config benchmarks/configs/code-model-150m.json \
                      --timeline --batch 1 ${spec:+--speculative-config "$spec"} 2>&1 \
                      | grep -v "us idle between" | tail -34
                  done ;;
    hostprofile) # issue 15: the host's functions in batch-1 plain and ngram k = 8 passes (cProfile;
                 # the 150M model after `spectrain`, else the bundled one); the whole report in $OUT
                 target=(); [[ -f runs/code-model-150m/hf/config.json ]] && target=(--target runs/code-model-150m/hf)
                 python3 benchmarks/host_cprofile.py "${target[@]}" --top 25 --out "$OUT/host_profile.txt" \
                   > /dev/null 2>&1
                 sed -n '/===== ngram/,$p' "$OUT/host_profile.txt" | head -45 ;;
    quantquality) # issue 17's quality: held-out loss and greedy agreement of fp8/int8 weights and
                  # fp8 KV against bf16, for the bundled model and (once `spectrain` made it) the 150M one
                  python3 benchmarks/quant_quality.py --out "$OUT/quant_quality.json" \
                    > "$OUT/quant_quality.log" 2>&1; tail -10 "$OUT/quant_quality.log"
                  if [[ -f runs/code-model-150m/hf/config.json ]]; then  # windows of seq-len + 1 <= 1024
                    python3 benchmarks/quant_quality.py --model runs/code-model-150m/hf --corpus python \
                      --val-fraction 0.01 --seq-len 1023 --max-windows 256 \
                      --out "$OUT/quant_quality_150m.json" > "$OUT/quant_quality_150m.log" 2>&1
                    tail -10 "$OUT/quant_quality_150m.log"
                  fi ;;
    quantvariants) # issue 17: one-row GEMVs over int8/fp8 weights with cheaper conversions (and tensor
                   # cores) against the package's kernel and bf16; checks, then a few tiles each (~4 min)
                   python3 benchmarks/quant_gemv_variants.py --out "$OUT/quant_gemv_variants.json" \
                     > "$OUT/quant_gemv_variants.log" 2>&1
                   grep -A2 "FAILED" "$OUT/quant_gemv_variants.log" | head -20
                   tail -28 "$OUT/quant_gemv_variants.log" ;;
    quantlatency) # issue 17's speed rows: batch-1 and batch-8 decode with bf16, fp8 and int8
                  # weights on the 8B and 1B shapes, one after another on this GPU (ratios
                  # within one call)
                  for shape in llama-3.1-8b llama-3.2-1b; do
                    for q in none fp8 int8; do
                      flag=(); [[ $q != none ]] && flag=(--quantization "$q")
                      python3 -m parallm.cli bench latency --config "benchmarks/configs/$shape.json" \
                        --max-model-len 4096 --batch-sizes 1,8 --iters 2 "${flag[@]}" \
                        --out "$OUT/latency_${shape}_$q.json" > "$OUT/latency_${shape}_$q.log" 2>&1
                      tail -6 "$OUT/latency_${shape}_$q.log"
                    done
                  done ;;
    quantthroughput) # issue 17's offline rows: bf16 against fp8 weights with an fp8 KV cache,
                     # Qwen3-0.6B and Llama-3.2-1B shapes (bench throughput's 256 requests)
                     for shape in qwen3-0.6b llama-3.2-1b; do
                       for q in none fp8; do
                         flag=(); [[ $q == fp8 ]] && flag=(--quantization fp8 --kv-cache-dtype fp8)
                         python3 -m parallm.cli bench throughput --config "benchmarks/configs/$shape.json" \
                           --max-model-len 4096 "${flag[@]}" --out "$OUT/throughput_${shape}_$q.json" \
                           > "$OUT/throughput_${shape}_$q.log" 2>&1
                         tail -4 "$OUT/throughput_${shape}_$q.log"
                       done
                     done ;;
    tp) # issue 18: Llama-3.1-8B shape at TP=1 (CUDA graphs, then eager: what graphs alone give)
        # and TP=N (N = this machine's GPUs), with graphs and, should those fail, eager
        n=$(nvidia-smi -L | wc -l)
        runs=("1" "1 --enforce-eager"); (( n > 1 )) && runs+=("$n" "$n --enforce-eager")
        for run in "${runs[@]}"; do  # $run unquoted below: "1 --enforce-eager" is two arguments
          tp=${run%% *}; name=tp$tp; [[ $run == *eager* ]] && name+=eager
          python3 -m parallm.cli bench latency --config benchmarks/configs/llama-3.1-8b.json \
              --max-model-len 4096 --batch-sizes 1,8,32 --tensor-parallel-size $run \
              --out "$OUT/latency_llama8b_$name.json" > "$OUT/latency_llama8b_$name.log" 2>&1
          tail -7 "$OUT/latency_llama8b_$name.log"
          [[ $run == *eager* ]] && continue
          python3 -m parallm.cli bench throughput --config benchmarks/configs/llama-3.1-8b.json \
              --max-model-len 4096 --tensor-parallel-size "$tp" \
              --out "$OUT/throughput_llama8b_$name.json" > "$OUT/throughput_llama8b_$name.log" 2>&1
          tail -4 "$OUT/throughput_llama8b_$name.log"
        done ;;
    dp) # issue 18: offline throughput of the Llama-3.1-8B shape, the same 256 requests on one
        # engine (-dp 1) and on one replica per GPU of this machine (-dp N); N=1 runs -dp 1 only
        n=$(nvidia-smi -L | wc -l)
        sizes=(1); (( n > 1 )) && sizes+=("$n")
        for dp in "${sizes[@]}"; do
          python3 -m parallm.cli bench throughput --config benchmarks/configs/llama-3.1-8b.json \
              --max-model-len 4096 --data-parallel-size "$dp" \
              --out "$OUT/throughput_llama8b_dp$dp.json" > "$OUT/throughput_llama8b_dp$dp.log" 2>&1
          grep -m1 "^data_parallel_size\|^parallm:" "$OUT/throughput_llama8b_dp$dp.log" | cut -c1-300
          tail -3 "$OUT/throughput_llama8b_dp$dp.log"
        done ;;
    allreduce) # NCCL against symmetric memory's one-shot all-reduce at decode sizes, all GPUs
               n=$(nvidia-smi -L | wc -l)
               torchrun --standalone --nproc-per-node "$n" benchmarks/allreduce_bench.py \
                 --out "$OUT/allreduce_${n}gpu.json" > "$OUT/allreduce_${n}gpu.log" 2>&1
               tail -22 "$OUT/allreduce_${n}gpu.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
