# `make test` and `make demo` set everything up from nothing: a virtual environment in .venv,
# torch pinned first (an unpinned torch would pull a multi-GB CUDA build), then lincompile.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch: empty takes what pip finds (here, CI's CPU wheel on disk; on a fresh Linux
# machine, PyPI's wheel with its CUDA libraries); TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# takes the CPU-only build.
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist); each gets an equal share of the cores. Whole files go to one process, so
# module-scoped fixtures (a real-model ONNX export, say) are built once.
TEST_WORKERS ?= 2

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/lincompile demo

clean:
	rm -rf $(VENV) .pytest_cache
