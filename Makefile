# Set-up on a fresh machine is two commands: `make run` (the main job on the embedded default model) and
# `make test` (the test suite). Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.base
	$(PY) -m subl_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

test: $(VENV)/.test
	$(PY) -c "from subl_jax.core import api; api.converted_smollm2()"  # the default model, once, before two workers
	$(PY) -m pytest -q -n 2 tests
