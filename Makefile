# clt-lightning: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build for this machine (x86_64, no GPU: a CUDA wheel that runs on the CPU).
# CUDA users: `make install TORCH_SPEC="torch torchvision"` (or any pin for your driver).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= cpu,dev
# circuit-tracer's loader for the export round-trip test, without its dependencies (see
# pyproject.toml); CIRCUIT_TRACER_SPEC= skips it (the test then skips, saying why).
CIRCUIT_TRACER_SPEC ?= circuit-tracer==0.5.0
STAMP := $(VENV)/.installed

# sweep settings (see README "Reproducing the paper")
DATA_ROOT ?= data
RUNS ?= runs/sweep
DEVICES ?= 1
SWEEP_ARGS ?=
BENCH_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: help install browser test test-slow test-all lint format bench bench-quick quickstart sweep sweep-dry tables clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(if $(CIRCUIT_TRACER_SPEC),$(PY) -m pip install --quiet --no-deps $(CIRCUIT_TRACER_SPEC))
	@touch $(STAMP)

install: $(STAMP) ## build .venv in the checkout (torch pinned for this machine) and install the package

browser: ## install Debian's chromium for the latent site's browser test (root or passwordless sudo; failure tolerated)
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	{ $$SUDO apt-get install -y -qq chromium || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
	  || echo "make browser: could not install chromium; the latent site's browser test will be skipped"

test: $(STAMP) browser ## run the fast test suite (CPU, no downloads; tries `make browser` first)
	$(PY) -m pytest -q

test-slow: $(STAMP) ## run only the tests marked slow
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## run the benchmark suite (~40 min on 2 cores) and write docs/benchmarks.md (BENCH_ARGS="--only decode,online" re-runs some)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

bench-quick: $(STAMP) ## check that every benchmark runs (tiny sizes, writes nothing to docs/)
	$(PY) -m benchmarks.run --quick

quickstart: $(STAMP) ## offline end-to-end run on real digits: teacher, cache, 3 CLTs, evaluation, retrieval, report
	$(PY) -m experiments.quickstart

sweep: $(STAMP) ## the paper's grid (3 datasets x 2 backbones x 3 sparsifiers); DATA_ROOT, RUNS, DEVICES
	$(PY) -m experiments.sweep --data-root $(DATA_ROOT) --runs $(RUNS) --devices $(DEVICES) $(SWEEP_ARGS)

sweep-dry: $(STAMP) ## print the sweep plan without running anything
	$(PY) -m experiments.sweep --data-root $(DATA_ROOT) --runs $(RUNS) --devices $(DEVICES) --dry-run $(SWEEP_ARGS)

tables: $(STAMP) ## gather finished sweep runs into the paper's tables and figures (reports/paper_tables)
	$(PY) -m experiments.tables --runs $(RUNS) --out reports/paper_tables

clean: ## remove generated data (runs, caches, reports); keeps .venv
	rm -rf runs .cache reports lightning_logs wandb .pytest_cache .ruff_cache
