# Routine tasks. `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help setup demo test test-gpu lint format bench-latency bench-throughput clean

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

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
