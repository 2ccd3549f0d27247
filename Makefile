# Routine tasks. `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help setup demo test test-gpu lint format bench-latency bench-throughput bench-train bench-serve gpu-session ab-tree peers-wheels server-wheels clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/parallm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q 'torch>=2.11'
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: $(BIN)/parallm  ## create .venv and install parallm with its dev tools

demo: setup  ## generate with the bundled model (or a small random one if none is bundled)
	@if [ -f parallm/assets/code-model/config.json ]; then \
	  $(BIN)/parallm generate "def fibonacci(n):" --max-tokens 64; \
	else \
	  [ -d runs/tiny ] || $(BIN)/parallm make-tiny-model runs/tiny; \
	  $(BIN)/parallm generate --model runs/tiny "def fibonacci(n):" --max-tokens 32; \
	fi

test: setup  ## lint, then the CPU test suite
	$(BIN)/ruff check parallm tests benchmarks
	$(BIN)/python -m pytest -q

test-gpu: setup  ## the GPU tests (needs CUDA)
	$(BIN)/python -m pytest -q -m gpu

lint: setup  ## ruff check
	$(BIN)/ruff check parallm tests benchmarks

format: setup  ## ruff format + import sorting
	$(BIN)/ruff check --fix parallm tests benchmarks
	$(BIN)/ruff format parallm tests benchmarks

CONFIG ?= benchmarks/configs/llama-3.2-1b.json

bench-latency: setup  ## decode latency against the bandwidth roofline (CONFIG=..., needs CUDA)
	$(BIN)/parallm bench latency --config $(CONFIG) --max-model-len 4096

bench-throughput: setup  ## offline throughput against transformers (CONFIG=..., needs CUDA)
	$(BIN)/parallm bench throughput --config $(CONFIG) --max-model-len 4096 --compare-hf

bench-train: setup  ## training tokens/s and MFU (CONFIG=..., needs CUDA)
	$(BIN)/parallm bench train --config $(CONFIG) --seq-len 2048 --micro-batch-size 8 --compile

# The Azure conversation trace when ../shared has it; random prompts otherwise.
TRACE ?= $(wildcard ../shared/traces/AzureLLMInferenceTrace_conv.csv)

bench-serve: setup  ## serving benchmark against a running server (URL=..., TRACE=... or random prompts)
	$(BIN)/parallm bench serve --base-url $(or $(URL),http://127.0.0.1:8000) \
	  $(if $(TRACE),--dataset-name trace --dataset-path $(TRACE) --time-scale 4 \
	    --trace-duration-s 120 --max-input-tokens 3500,--random-input-len 256 \
	    --random-output-len 64 --num-prompts 200) --goodput ttft:500 tpot:50

gpu-session: setup  ## GPU tests and benchmarks in one go (STEPS="tests latency ...")
	OUT=$(or $(OUT),runs/gpu) bash scripts/gpu_session.sh $(or $(STEPS),tests latency)

ab-tree:  ## a revision's tree under .ab/NAME for a device call (NAME=... REV=...; scripts/ab_tree.sh)
	bash scripts/ab_tree.sh $(NAME) $(REV)

peers-wheels: setup  ## fetch vLLM 0.26.0's wheels into .peers/ and print the GPU machine's calls (benchmarks/peers)
	PY=$(BIN)/python bash benchmarks/peers/fetch_vllm_wheels.sh

server-wheels: setup  ## fetch the server's wheels (not on the GPU image) into .whl/server for gpu_session.sh serve
	$(BIN)/python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl/server fastapi uvicorn uvloop httptools pyzmq msgspec aiohttp 'pydantic>=2.6' 'openai<3'
	@du -sh .whl/server

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
