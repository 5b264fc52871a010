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
# (servers, clusters, workers), so more workers than cores pays, but a third one starved
# the real-node session beside them (measured: 23 min against 16). A file's tests stay
# together, and the longest files go first (tests/durations.json; `--store-durations`
# refreshes it). The tests marked real_nodes run in one more session beside them: the
# real nodes' bridges and nftables tables exist once per host. Every session uses one
# cluster that `make test` starts first (each test has its own namespace; the real-node
# session adds the real nodes to it): one control plane instead of one per session
# (each about 40 CPU-seconds a run); each worker starts its own PostgreSQL.
TEST_WORKERS ?= 2
# Python writes its bytecode caches (git-ignored __pycache__ folders) even where the
# environment asks it not to: without them every process of a run compiles again what it
# imports (each pytest process 5 CPU-seconds more, mostly rewriting the test modules'
# asserts; each gateway process half a second).
unexport PYTHONDONTWRITEBYTECODE

.DEFAULT_GOAL := help

.PHONY: help install run test test-fast lint bench cluster cluster-down system-deps cluster-bin images

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

# PostgreSQL for the tests' own instances (their Prometheus is built by cluster/build.sh:
# Debian's has no Kubernetes service discovery); buildah and mmdebstrap for
# `make images`; containerd, runc, the CNI plugins, nftables, iptables and socat for
# the local cluster's real nodes. Debian's packages, installed only when missing.
SYSTEM_DEPS := postgresql:/usr/lib/postgresql/*/bin/pg_ctl \
  buildah:/usr/bin/buildah mmdebstrap:/usr/bin/mmdebstrap containerd:/usr/bin/containerd runc:/usr/sbin/runc \
  containernetworking-plugins:/usr/lib/cni/bridge nftables:/usr/sbin/nft iptables:/usr/sbin/iptables \
  socat:/usr/bin/socat

system-deps: ## install from Debian what the tests, images and real nodes need, if missing (tests use their own instances)
	@missing=""; \
	  for dep in $(SYSTEM_DEPS); do \
	    ls $${dep#*:} >/dev/null 2>&1 || missing="$$missing $${dep%%:*}"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "==> installing$$missing from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	    systemctl disable --now postgresql containerd >/dev/null 2>&1 || true; \
	    for s in postgresql containerd; do service $$s stop >/dev/null 2>&1 || true; done; \
	  fi

cluster-bin: ## build the local cluster's binaries and the tests' Prometheus into ~/.cache/remotegpu (once)
	@cluster/build.sh >/dev/null

images: install system-deps ## build the images with buildah (only when their inputs changed); BASE_IMAGE=python:3.11-slim-bookworm for the official base
	@$(BIN)/python -m cluster.images build

run: install ## start the service (embedded default) on http://127.0.0.1:8000
	$(BIN)/remotegpu serve

# Phases, each timed (tests/phase.sh), so one log gives a cold run's budget. The Go
# binaries need nothing but Go, so they compile (CPU) while the Python install, the
# Debian packages and the images download and copy (network, disk); the images reuse
# the install's uv cache (cluster/images.py). The test sessions start once both are in.
PHASE := tests/phase.sh
# The sessions' shared cluster (its state; `make cluster`'s is .cluster).
TEST_CLUSTER := $(CURDIR)/build/test-cluster

test: ## run every test (starts and stops its own cluster, PostgreSQL, Prometheus; builds the binaries and images first)
	@mkdir -p build; started=$$SECONDS; \
	  $(PHASE) cluster-bin $(MAKE) --no-print-directory cluster-bin & bins=$$!; \
	  $(PHASE) install $(MAKE) --no-print-directory install \
	    && $(PHASE) system-deps $(MAKE) --no-print-directory system-deps \
	    && $(PHASE) images $(MAKE) --no-print-directory images; built=$$?; \
	  wait $$bins && [ $$built = 0 ] || exit 1; \
	  export REMOTEGPU_CLUSTER_DIR=$(TEST_CLUSTER) KUBECONFIG=$(TEST_CLUSTER)/kubeconfig; \
	  $(BIN)/python -m cluster.localcluster down; trap '$(BIN)/python -m cluster.localcluster down' EXIT; \
	  $(PHASE) cluster $(BIN)/python -m cluster.localcluster up --real-nodes 0 --gpu-nodes 4 || exit 1; \
	  echo "==> the real-node tests run in a session of their own beside the others (log: build/test-real-nodes.log)"; \
	  $(PHASE) "tests (real nodes)" $(BIN)/pytest -m real_nodes $(PYTEST_ARGS) > build/test-real-nodes.log 2>&1 & real=$$!; \
	  $(PHASE) "tests (parallel, $(TEST_WORKERS) workers)" \
	    $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not real_nodes" $(PYTEST_ARGS); rest=$$?; \
	  wait $$real; real_rc=$$?; \
	  [ $$rest = 5 ] && rest=0; [ $$real_rc = 5 ] && real_rc=0; \
	  echo "==> the real-node tests (build/test-real-nodes.log):"; tail -n 60 build/test-real-nodes.log; \
	  took=$$((SECONDS - started)); echo "==> make test: $$((took / 60))m$$(printf %02d $$((took % 60)))s in all"; \
	  exit $$(( rest || real_rc ))

test-fast: install ## unit tests only (no cluster, no PostgreSQL)
	$(BIN)/pytest -m "not cluster and not postgres" $(PYTEST_ARGS)

lint: install ## ruff and mypy, clean
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy base/remotegpu_base remotegpu gateway/remotegpu_gateway operator/remotegpu_operator inference-worker/remotegpu_worker

bench: install cluster-bin ## run the benchmarks under bench/ and print their numbers
	@for b in bench/*.py; do echo "==> $$b"; $(BIN)/python $$b || exit 1; done

cluster: install system-deps cluster-bin images ## start the local cluster (KWOK nodes and real ones, fake GPUs, the images imported); prints the kubeconfig path last
	@$(BIN)/python -m cluster.localcluster up --import-images

cluster-down: install ## stop the local cluster started by `make cluster` and remove every trace
	@$(BIN)/python -m cluster.localcluster down
