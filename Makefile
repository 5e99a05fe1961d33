# The two README commands. Each does all of the set-up itself on a fresh machine with Python 3.10+:
#   make train   virtualenv + install + the default recipe end to end on embedded data (outputs/default)
#   make test    virtualenv + install + the test suite
# Variables: PYTHON (interpreter that makes the venv), VENV (its folder), TORCH (the torch requirement:
# the CPU build 2.13.0 by default; TORCH=torch on a machine with a GPU), PIP_FLAGS (extra flags of the
# project's install, e.g. constraints: .ci/run uses them for the floor / newest versions), RECIPE.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_FLAGS ?=
RECIPE ?= recipes/default.yaml

.PHONY: train test install

train: $(VENV)/.installed
	$(VENV)/bin/rxt train $(RECIPE)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@echo "== virtualenv $(VENV) with $(TORCH) and this project (first run: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[test]" $(PIP_FLAGS)
	@touch $@
