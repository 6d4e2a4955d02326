# The two commands a newcomer needs: `make setup`, then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/realm guest build --all

test:
	$(BIN)/python -m pytest -q

bench:
	$(BIN)/python benchmarks/host_speed.py
