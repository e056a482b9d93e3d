# Two commands on a fresh machine: `make demo` (set up + run the main job) and `make test` (set up + tests).
# Two legs, the two ends of the supported megatron-core range, each in its own virtual environment and
# installed from its own pinned versions (constraints/, docs/compatibility.md):
#   make test            Python 3.11, megatron-core 0.16.1, the local CPU torch wheel 2.13.0    (.venv)
#   make test PY=3.12    Python 3.12, megatron-core 0.19.x, torch from PyPI (a CUDA build)      (.venv312)
PY ?= 3.11
VENV ?= $(if $(filter 3.11,$(PY)),.venv,.venv$(subst .,,$(PY)))
CONSTRAINTS := constraints/py$(PY).txt
# python3.X from PATH when it runs, else pyenv's newest 3.X (pyenv's shim fails for a non-global version).
PYTHON ?= $(shell python$(PY) -c 'import sys; print(sys.executable)' 2>/dev/null \
	|| echo "$$(pyenv root)/versions/$$(pyenv latest $(PY))/bin/python$(PY)")
BIN := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PINS_VENV := .venv-pins$(subst .,,$(PY))

.PHONY: setup demo test test-fast pins clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN) || $(PYTHON) -m venv $(VENV)
	$(BIN) -m pip install -q --upgrade pip
	$(BIN) -m pip install -q -c $(CONSTRAINTS) -e ".[test,eval]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN) -m pause_megatron.cli recipe run recipes/quickstart.yaml

test: $(STAMP)
	bash tests/slurm/install.sh
	@$(BIN) -m pip list 2>/dev/null | grep -E '^(torch|megatron-core) '
	$(BIN) -m pytest -q -rs

test-fast: $(STAMP)
	$(BIN) -m pytest -q -m "not slow"

# Move the pins of a leg: edit the torch and megatron-core lines of its constraints file, then `make pins`
# (PY=...) re-resolves every other package in a scratch environment and rewrites the file.
pins:
	rm -rf $(PINS_VENV)
	$(PYTHON) -m venv $(PINS_VENV)
	$(PINS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PINS_VENV)/bin/python -m pip install -q $$(grep -E '^(torch|megatron-core)==' $(CONSTRAINTS)) -e ".[test,eval]"
	{ sed -n '/^#/p' $(CONSTRAINTS); $(PINS_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } \
		> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(PINS_VENV)

clean:
	rm -rf $(VENV) runs .pytest_cache
