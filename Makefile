# Set-up and the README's two commands:
#   make quickstart   a virtual environment in .venv, the native library, then the quickstart
#   make test         the same set-up, then the whole test suite
# Each step is skipped when already done: the environment is reinstalled only when
# requirements.txt changes, the native library rebuilt only when its sources do.

PYTHON ?= $(shell command -v python3.11 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
NATIVE := kd_jax/native/_build/libkd_jax_onednn.so
QUICKSTART_DIR ?= workdir-quickstart

.PHONY: setup quickstart test test-fast

setup: $(INSTALLED) $(NATIVE)

# Stamped only after a successful install, so an interrupted one is redone.
$(INSTALLED): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# Without a C++ compiler kd_jax runs the same on XLA's convolutions, only slower on CPUs.
$(NATIVE): $(INSTALLED) kd_jax/native/onednn_conv.cc kd_jax/native/build.py
	@if command -v "$${CXX:-c++}" >/dev/null 2>&1; then \
	  $(BIN)/python -m kd_jax.native.build; \
	else \
	  echo "kd_jax: no C++ compiler (\$$CXX or c++), native library not built: CPU convolutions stay XLA's"; \
	fi

quickstart: setup
	$(BIN)/python launch.py --config=configs/quickstart.py --workdir=$(QUICKSTART_DIR)
	@echo "report: $(QUICKSTART_DIR)/report.md"

# One worker per CPU core, each taking whole test files, so that a file's shared
# runs (its module fixtures) are made once, in the order tests/conftest.py gives them:
# the longest first. Compiled programs are kept in .cache/jax between runs: a
# repeated run compiles only what changed.
PYTEST := JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax $(BIN)/python -m pytest -n auto \
	--dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"
