# Set-up on a fresh machine: `make quickstart` (the main job) and `make test` (the test suite).
# Both create .venv with the CPU build of torch 2.13 and dreamtune with all extras, at the versions in
# constraints.txt (the ones CI last passed with). `make test CONSTRAINTS=` installs today's newest instead;
# `make constraints` re-pins constraints.txt to today's newest releases.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
CONSTRAINTS ?= constraints.txt
PIN = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(BIN)/dreamtune: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIN) torch==2.13.0
	$(BIN)/pip install -q $(PIN) -e ".[dev]"
	touch $@

.PHONY: install quickstart test test-fast constraints
install: $(BIN)/dreamtune

quickstart: install
	$(BIN)/dreamtune quickstart --out runs/quickstart

test: install
	$(BIN)/python -m pytest -q

# the edit-test loop: everything but the end-to-end runs of a minute or more and the multi-process ones
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

constraints:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q torch==2.13.0
	.venv-latest/bin/pip install -q -e ".[dev]"
	(sed -n '1,2p' constraints.txt; .venv-latest/bin/pip freeze --exclude-editable | sed 's/+[A-Za-z0-9.]*$$//') > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-latest
