# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use. TORCH_SPEC picks the torch build: the CPU wheel by default
# (pip finds it on this machine's disk); override e.g. TORCH_SPEC='torch>=2.4' on a GPU host.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[dev,bench,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m effattn compare

# two pytest workers (pytest-xdist): the suite is CPU-bound and CI has 2 cores
test: $(STAMP)
	$(PY) -m pytest -x -n 2

# The architecture's floors (import-linter, configured in pyproject.toml), ruff's rules and its format.
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
