# Two commands on a fresh machine: `make demo` (set up + run the main job) and `make test` (set up + tests).
# CPU installs take the local torch 2.13.0 wheel (pip finds it); an unpinned torch would pull a CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,eval]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m pause_megatron.cli recipe run recipes/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
