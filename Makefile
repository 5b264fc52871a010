# RemoteGPU Image: `make run` starts the embedded default, `make test` runs every test.
# Both install what they need; a warm re-run installs and rebuilds nothing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` runs test files in parallel: most of the suite waits on real processes
# (servers, clusters, workers), so more workers than cores pays. Each worker starts
# its own cluster and PostgreSQL when it first needs one; a file's tests stay together.
TEST_WORKERS ?= 3

.DEFAULT_GOAL := help

.PHONY: help install run test test-fast lint bench cluster cluster-down system-deps cluster-bin

help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-z-]+:.*## /{printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV):
	@echo "==> creating the virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Pinned dependencies (requirements.lock, from `uv pip compile`); PyTorch is large, and
# uv keeps its download cache outside the repository (~/.cache/uv), so it is fetched
# once per machine.
$(STAMP): requirements.lock pyproject.toml | $(UV)
	@echo "==> installing pinned Python dependencies (first time: PyTorch and friends, a few minutes)"
	VIRTUAL_ENV=$(VENV) $(UV) pip sync requirements.lock
	VIRTUAL_ENV=$(VENV) $(UV) pip install --no-deps -e .
	@touch $@

install: $(STAMP) ## install the Python environment (.venv)

system-deps: ## install PostgreSQL and Prometheus from Debian if missing (tests use their own instances)
	@missing=""; \
	  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	  if [ -n "$$missing" ]; then \
	    echo "==> installing$$missing from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	    systemctl disable --now prometheus postgresql >/dev/null 2>&1 || true; \
	    for s in prometheus postgresql; do service $$s stop >/dev/null 2>&1 || true; done; \
	  fi

cluster-bin: ## build the local control plane binaries into ~/.cache/remotegpu (once)
	@cluster/build.sh >/dev/null

run: install ## start the service (embedded default) on http://127.0.0.1:8000
	$(BIN)/remotegpu serve

test: install system-deps cluster-bin ## run every test (starts and stops its own cluster, PostgreSQL, Prometheus)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install ## unit tests only (no cluster, no PostgreSQL)
	$(BIN)/pytest -m "not cluster and not postgres" $(PYTEST_ARGS)

lint: install ## ruff and mypy, clean
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy base/remotegpu_base remotegpu gateway/remotegpu_gateway operator/remotegpu_operator inference-worker/remotegpu_worker

bench: install cluster-bin ## run the benchmarks under bench/ and print their numbers
	@for b in bench/*.py; do echo "==> $$b"; $(BIN)/python $$b || exit 1; done

cluster: install cluster-bin ## start the local control plane (KWOK nodes, fake GPUs); prints the kubeconfig path last
	@$(BIN)/python -m cluster.localcluster up

cluster-down: install ## stop the local control plane started by `make cluster`
	@$(BIN)/python -m cluster.localcluster down
