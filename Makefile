# Two commands do all set-up on a fresh machine:  make demo  /  make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU wheel on this machine's disk; on GPU machines install your CUDA torch first
# (see README) and run `make install TORCH=` to keep it.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# DeepSpeed JIT-builds its CPU ops (CPU Adam, the shared-memory all-reduce) against this venv's
# torch: keep the builds (and their lock files) with the venv, not in the user-wide
# ~/.cache/torch_extensions that every other checkout on the machine shares
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
# ... built by one ninja: the venv's first on PATH, as in an activated venv. The system's ninja
# (1.11 here) and pip's (1.13, a DeepSpeed dependency) hash build commands differently, so each
# rebuilt the other's ops: three shared-memory-op rebuilds of ~35 s in one suite run, measured.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/megamt demo

test: install
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS) tests

clean:
	rm -rf runs .pytest_cache
