# The two commands a newcomer needs: `make setup`, then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup lint test test-fast bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,ray]'
	$(BIN)/python -m realm.backends.native
	$(BIN)/python -m realm.models.spm
	$(BIN)/realm guest build --all

# lint and types are gates: a tree that fails them fails `make test`
lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# everything that needs no compiled decode step and no minutes of work
test-fast:
	$(BIN)/python -m pytest -q -m "not compiled and not slow and not ray"

bench:
	$(BIN)/python benchmarks/host_speed.py
