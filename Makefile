# Shorthands for the two commands in README.md; .ci/run spells out the test command.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,examples,notebooks]"

# The main job: prove every hand-derived VJP against autodiff, then train on digits.
demo: install
	$(BIN)/jax-batchinhib verify
	$(BIN)/jax-batchinhib train

# The whole test suite, notebooks included. pytest's exit code 5 (no tests) fails.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check jax_batchinhib
