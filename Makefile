# Set-up on a fresh machine: `make quickstart` (the main job) and `make test` (the test suite).
# Both create .venv with the CPU build of torch 2.13 and dreamtune with all extras.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

$(BIN)/dreamtune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: install quickstart test
install: $(BIN)/dreamtune

quickstart: install
	$(BIN)/dreamtune quickstart --out runs/quickstart

test: install
	$(BIN)/python -m pytest -q
