# MATT — developer entry points. Everything runs inside .venv/ (created on first use).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-slow assets demo demo-gemma3 quality smoke bench gpu-check clean

# torch first (local CPU wheel), then the project with its dev extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Tests that need the real offline models and corpus (fetched by `make assets`).
test-slow: $(STAMP) assets
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

assets: $(STAMP)
	$(PY) scripts/prepare_assets.py

demo: $(STAMP) assets
	$(PY) experiments/transfer.py experiment=demo

demo-gemma3: $(STAMP) assets
	$(PY) experiments/transfer.py experiment=demo_gemma3

# The strong-teacher comparison (README "Results"): every method at the same wall-clock budget on
# Gemma 3 270M + 8K Ukrainian tokens, one MLflow run each, then the table and budget curves (~2 h).
quality: $(STAMP) assets
	$(PY) experiments/transfer.py -m experiment=quality_gemma3
	$(PY) experiments/report.py experiment_name=quality_gemma3

# A tiny end-to-end transfer (offline, seconds) and the report over all smoke runs so far.
smoke: $(STAMP)
	$(PY) experiments/transfer.py experiment=smoke
	$(PY) experiments/report.py experiment_name=smoke

bench: $(STAMP)
	$(PY) benchmarks/bench_aim.py

# On a machine with a CUDA device (~5 min): CUDA unit tests, the benchmark on CUDA, a short bf16
# Gemma 3 270M transfer, one table. Without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf outputs multirun mlruns .pytest_cache
